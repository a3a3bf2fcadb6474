"""``flystage review``: a local web page to look at every prediction and correct the wrong ones.

One module per job: ``predictions`` reads a predictions file and finds its images,
``store`` keeps the decisions and writes the reviewed-labels CSV (a ``flystage organise
--labels-csv`` input), ``thumbnails`` makes and caches what the model saw, ``occlusion`` shows
which parts of an image the ONNX model relied on, ``app`` is the Flask page and its API, and
``command`` is the command line. Flask is the ``review`` extra: only this command needs it.
"""
