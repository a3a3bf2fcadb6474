"""The training side of flystage: everything that needs torch.

- :mod:`~flystage.training.data`: the decoded-image cache, the dataset and class balance;
- :mod:`~flystage.training.families`: the backbone-family table (torch-free), whose families
  are :mod:`~flystage.training.hog`, :mod:`~flystage.training.lite` (weights:
  :mod:`~flystage.training.backbones`), :mod:`~flystage.training.torchvision_nets` and
  :mod:`~flystage.training.small_cnn`; :mod:`~flystage.training.models`: one constructor for
  them all, and what they share;
- :mod:`~flystage.training.modes`, :mod:`~flystage.training.probe`: what the epoch loop trains
  (full, linear probe, fine-tune);
- :mod:`~flystage.training.config`: ``TrainConfig`` and its options;
- :mod:`~flystage.training.loop`: ``fit``, the epoch loop with its checkpoints;
- :mod:`~flystage.training.ensemble`: ``train_model``, ensemble members and calibration;
- :mod:`~flystage.training.train`: ``flystage train`` and the SageMaker training program;
- :mod:`~flystage.training.folds`, :mod:`~flystage.training.crossval`: ``flystage crossval``;
- :mod:`~flystage.training.export`: the model artefact written from a torch model (ONNX,
  weights, metadata), and the torch model read back.

The rest of the package (reading and preprocessing images, the artefact's reader, predicting,
serving, organising, the AWS control plane) runs without torch; the serve image has none.
"""
