# The README's two commands: `make demo` and `make test`.  Both set up .venv first (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.dcm-installed
export DVC_NO_ANALYTICS := 1
PYTEST_ARGS ?=
# stage runs at a time (`dcm repro -j`), each with this machine's cores // JOBS torch threads; JOBS=1 is
# `dvc repro` one stage after another
JOBS ?= 2
# $(call pipeline,TARGETS,PIPELINE-RUN OPTIONS): one MLflow parent run for this pipeline execution (every stage
# run nests under it) around `dcm repro -j $(JOBS) TARGETS`, closed with its exit status
pipeline = run_id=$$($(VENV)/bin/dcm pipeline-run $(2)); status=0; \
	DCM_PARENT_RUN_ID=$$run_id PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dcm repro -j $(JOBS) $(1) \
		|| status=$$?; \
	$(VENV)/bin/dcm pipeline-run --finish "$$run_id" --exit-status $$status; exit $$status

.PHONY: setup demo test test-fast ablations paper clean-outputs

setup: $(STAMP)

# CPU build of torch unless a CUDA driver is present: on these machines `torch==2.13.0` is the
# CPU wheel on disk (an unpinned `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@start=$$(date +%s); \
	$(PIP) install -q --upgrade pip >/dev/null 2>&1 || true; \
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch==2.13.0"; fi; \
	$(PIP) install -q -e ".[dev]" && \
	echo "dcm installed in $(VENV) in $$(( $$(date +%s) - start )) s"
	@touch $(STAMP)

demo: setup
	@test -d .dvc || $(VENV)/bin/dvc init -q $$(test -d .git || echo --no-scm)
	$(VENV)/bin/dcm stages
	@$(call pipeline,report,)
	@echo
	@echo "== done =="
	@echo "comparison table : reports/summary.md  (HTML: reports/index.html)"
	@echo "metrics          : metrics/*.json      (dvc metrics show)"
	@echo "videos           : samples/<method>/*.mp4"
	@echo "plots            : reports/*.png, analysis/"
	@echo "MLflow UI        : $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

# Opt-in ablation rows of the paper (VCM, +OD, +OD+PE, +OD+PE+TC; MCM's): the same DVC stages, same
# budget.  `dcm params --enable ablations` switches them on in params.yaml (pipeline.ablations) and rewrites
# dvc.yaml; `dvc repro report_ablations` builds what the default DAG has not, then ablations/summary.md.
ablations: setup
	@test -d .dvc || $(VENV)/bin/dvc init -q $$(test -d .git || echo --no-scm)
	$(VENV)/bin/dcm params --enable ablations -o params.yaml
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro report_ablations
	@echo "ablation table: ablations/summary.md  (HTML: ablations/index.html)"

# The paper report: every row of the default DAG, the quality-against-steps rows (nfe_curve: true) and paper.rows
# (each trained paper.seeds times, seed + k), and MCM in its own setting (stage mcm_setting: the mcm preset's
# pipeline in mcm_setting/).  `dcm params --enable paper` switches them on in params.yaml (pipeline.paper) and
# rewrites dvc.yaml; `dcm repro report report_paper` builds what is missing, then reports/summary.md (the
# default table, as `make demo` writes it) and paper/summary.md, which opens with the paper's claims, each
# marked holds / does not hold / inconclusive from the paired intervals, with its control beside it (plain
# Euler at the same step count in place of the distilled row: "holds, but so does Euler-k").
paper: setup
	@test -d .dvc || $(VENV)/bin/dvc init -q $$(test -d .git || echo --no-scm)
	$(VENV)/bin/dcm params --enable paper -o params.yaml
	@$(call pipeline,report report_paper,--name paper)
	@echo "paper report: paper/summary.md  (HTML: paper/index.html; curves: paper/*_vs_nfe.png)"
	@echo "default table: reports/summary.md"

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Skip the slow end-to-end tests (CI runs them).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)
