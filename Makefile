# Two commands set up a fresh machine: `make demo` runs the main job, `make test` the test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench accuracy trace-speed trace-scale soak peers checkpoints default-checkpoint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# The CPU build of torch on this disk; a user with a GPU installs their CUDA build first.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,slurm]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/neurotrace demo --out demo_out --overwrite

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python benchmarks/convert.py
	$(BIN)/python benchmarks/predict.py
	$(BIN)/python benchmarks/predict_halo.py
	$(BIN)/python benchmarks/synth_vs_op.py
	$(BIN)/python benchmarks/weak_ceiling.py
	$(BIN)/python benchmarks/gap_limits.py
	$(BIN)/python benchmarks/noise_draws.py

# The weak-neurite accuracy benchmark: this project's tracers and the peers (about 30 min on 2 cores).
accuracy: setup peers
	$(BIN)/python benchmarks/accuracy.py --jobs 2

# Tracing speed: linearity in foreground voxels, and voxel scooping vs kimimaro and Rivulet2 (a few minutes).
trace-speed: setup peers
	$(BIN)/python benchmarks/trace_speed.py

# The default network (checkpoints/README.md): configs/train_default.yaml, 10,000 steps (about 85 min
# on 2 cores; --resume build/runs/default/last.json continues an interrupted run), its best copied in.
default-checkpoint: setup
	$(BIN)/neurotrace train --config configs/train_default.yaml --no-progress
	$(BIN)/python -c "import json, pathlib; d = json.loads(pathlib.Path('build/runs/default/best.json').read_text()); d['weights']['file'] = 'voxresnet_small_default.safetensors'; pathlib.Path('checkpoints/voxresnet_small_default.json').write_text(json.dumps(d, indent=2) + '\n')"
	cp build/runs/default/best.safetensors checkpoints/voxresnet_small_default.safetensors

# The DHPR experiment's checkpoints (checkpoints/README.md): candidate pool, DHPR selection, four trainings
# side by side on one thread each, and the model card's validation (about 1-1.5 h on 2 cores).
checkpoints: setup
	$(BIN)/python benchmarks/train_checkpoints.py all --parallel

# Blocked tracing + stitching on a 512 x 1024 x 1024 sparse map vs kimimaro chunked (about 10 min).
trace-scale: setup peers
	$(BIN)/python benchmarks/trace_scale.py

# Soak: the demo pipeline again and again on one local cluster for 10 min, a worker SIGKILLed
# mid-run and all restarted every cycle; memory, file descriptors and temporary files within bounds.
soak: setup
	$(BIN)/python benchmarks/soak.py --minutes 10

# Peer tracers (kimimaro, Rivulet2; APP2 if on PATH) in their own venv: see benchmarks/peers/README.md.
PEERS := .peers
$(PEERS)/.installed: benchmarks/peers/install.sh benchmarks/peers/requirements.txt
	PYTHON=$(PYTHON) bash benchmarks/peers/install.sh $(PEERS)

peers: $(PEERS)/.installed

clean:
	rm -rf $(VENV) $(PEERS) demo_out .pytest_cache .hypothesis
