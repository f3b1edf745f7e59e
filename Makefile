# The two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED_DATA ?= $(abspath ../shared/data)
export RARECHANGE_DATA ?= $(SHARED_DATA)

# One stamp per install flavour, remade when pyproject.toml changes.
SERVE_STAMP := $(VENV)/.stamp-serve
DEV_STAMP   := $(VENV)/.stamp-dev
# checkov (the manifests' and Dockerfiles' security scan) pins packages the project also uses,
# so it lives in its own venv; tests/deploy/test_checkov.py finds it through RARECHANGE_CHECKOV
CHECKOV_VENV := .venv-checkov
CHECKOV      := $(CHECKOV_VENV)/bin/checkov

.PHONY: demo test lint proto proto-check bench model model-aerial model-sentinel2 clean help

help:
	@echo "make demo   - install serving, start the server, detect changes on a sample pair (out/)"
	@echo "make test   - install everything, run the test suite"
	@echo "make lint   - ruff"
	@echo "make proto  - regenerate serving/api from proto/"
	@echo "make bench  - run every benchmark, rewrite docs/benchmarks.md"
	@echo "make model  - retrain the bundled thin-path model (models/synthetic-thin)"
	@echo "make model-aerial - retrain the bundled default model (models/aerial-rgb, needs ../shared/data)"
	@echo "make model-sentinel2 - retrain the bundled Sentinel-2 model (models/sentinel2-rgbn, needs ../shared/data)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[train,export,dev]'
	@$(BIN)/python -c "import torch; print('torch', torch.__version__)"
	@touch $@ $(SERVE_STAMP)

demo: $(SERVE_STAMP)
	$(BIN)/rarechange demo --out out

$(CHECKOV): deploy/security/install-checkov.sh
	PYTHON=$(PYTHON) bash deploy/security/install-checkov.sh $(CHECKOV_VENV)
	@touch $@

test: $(DEV_STAMP) $(CHECKOV)
	RARECHANGE_CHECKOV=$(abspath $(CHECKOV)) $(BIN)/python -m pytest tests

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

proto: $(DEV_STAMP)
	$(BIN)/python proto/generate.py

proto-check: $(DEV_STAMP)
	$(BIN)/python proto/generate.py --check

bench: $(DEV_STAMP)
	$(BIN)/python bench/run_all.py

model: $(DEV_STAMP)
	$(BIN)/rarechange train --preset thin --out runs/synthetic-thin
	$(BIN)/rarechange export runs/synthetic-thin --out models/synthetic-thin --version 0.1.0 --int8 --fp16 \
		--description "Thin-path demo model: the tiny disentangled-VAE encoder and classifier trained \
		for seconds on generated aerial-like scene pairs. Not trained on real imagery: use it to \
		try the system, not to find real changes."

model-aerial: $(DEV_STAMP)
	# the threshold is the leave-one-pair-out study's choice on the other seven folds
	$(BIN)/rarechange train --preset aerial-rgb --set train.threshold=0.82 --out runs/aerial-rgb-v2
	$(BIN)/rarechange export runs/aerial-rgb-v2 --out models/aerial-rgb --version 0.2.0 \
		--description "Aerial RGB change detector (uint8, about 0.5-2 m/px) trained on seven SZTAKI AirChange pairs (1.5 m/px, all 5,075 positive patches); Szada/1 held out. Threshold 0.82: the best pooled pixel F1 over the other seven folds of the leave-one-pair-out study (docs/results/study-aerial-rgb.md), not chosen on Szada/1. On Szada/1 through the serving path at that threshold: pixel F1 0.317, AUROC 0.913; change vector analysis 0.240, 0.808. Leave-one-pair-out over all eight pairs (this recipe, seed 0, cross-fold thresholds): mean pixel F1 0.470 (pooled 0.582) and mean AUROC 0.949, against CVA 0.221 and 0.731 and the from-scratch siamese 0.450 and 0.909. SZTAKI imagery is free for scientific use only."

# the card's paragraph (measured numbers: docs/results/aerial.md, "OSCD")
S2_DESCRIPTION := Sentinel-2 change detector (red, green, blue, near-infrared; uint16 L1C reflectance x 10,000, 10 m/px) trained on eight OSCD cities (1,585 positive patches); pisa and rennes held out. The paper's pre-training (60,000 steps, 3x the preset: mean held-out AUROC 0.851 +- 0.004 against 0.843 +- 0.005 at 20,000 steps over three pre-training seeds), then the distance head (encoder frozen, two parameters on the distance between the dates' common features), chosen over the paper's classifier, a fully fine-tuned variant and the from-scratch siamese on a validation city (bordeaux held out of a 7-city run: pixel AUROC 0.878 vs 0.801, 0.815 and 0.810; CVA 0.789). Threshold 0.735: the cross-fold choice of the city study (best F1 on the rennes fold's map). Held out, through the serving path: pisa (threshold not chosen on it) pixel F1 0.074 vs change vector analysis 0.069, AUROC 0.809 vs 0.720; rennes (the threshold's city) F1 0.321 vs 0.512, AUROC 0.902 vs 0.943; the from-scratch siamese on the same split (cross-fold thresholds): pisa F1 0.068, AUROC 0.794, rennes F1 0.190, AUROC 0.890. Mean AUROC 0.856 vs CVA 0.831: it reaches the project's AUROC target (0.85) on the mean of the two cities, not on pisa alone; by a threshold on its probability alone it does NOT reach the F1 target (+0.15 over CVA). Its masks therefore use the cva-gated rule by default (CVA's magnitude averaged over 5 x 5 pixels times this model's probability, cut at the outliers of that score's bulk: median + 5 robust SD of Otsu's lower class, never below 1.25; window, spread and floor chosen on the training cities, seven leave-one-city-out heads and a validation city, never on pisa or rennes; a request that sets a threshold, or --mask-rule threshold, gets probability >= threshold): pisa F1 0.264, rennes 0.590, mean 0.427 against CVA's 0.290 (+0.137; pooled pixels 0.355 vs 0.102; six pre-trainings: means 0.425-0.433, +0.135 to +0.143): well ahead of CVA, and still short of the +0.15 target, by 0.013. (Threshold rule: 0.074, 0.321; Otsu's cut of the same score, the rule until 0.2.1: 0.110, 0.587.) Inside unchanged 128 px windows of the validation cities the rule flags 0.95 % of pixels (Otsu's cut: 14 %), and a change over most of a request is still found whole. Check it on your own labelled pairs (rarechange evaluate) before relying on its masks. OSCD labels are CC BY-NC-SA 4.0 (non-commercial); the imagery is modified Copernicus Sentinel-2 data.
model-sentinel2: $(DEV_STAMP)
	# the distance head was chosen on a validation city (bordeaux); 60,000 pre-training steps (3x the
	# preset: mean held-out AUROC 0.851 vs 0.843 over three pre-training seeds); the threshold is the
	# city study's cross-fold choice (docs/results/aerial.md, "OSCD"); about 25 min on 2 cores
	$(BIN)/rarechange train --preset sentinel2-rgbn --set 'data.val_pairs=["pisa"]' --set train.seed=0 \
		--set train.pretrain_steps=60000 \
		--set model.classifier=distance --set train.encoder_lr_scale=0 --set train.finetune_steps=300 \
		--set train.finetune_steps_per_epoch=300 --set train.threshold=0.735 --out runs/sentinel2-rgbn-v2
	$(BIN)/rarechange export runs/sentinel2-rgbn-v2 --out models/sentinel2-rgbn --version 0.2.3 \
		--mask-rule cva-gated --description "$(S2_DESCRIPTION)"

clean:
	rm -rf $(VENV) out runs .pytest_cache .ruff_cache
