# Kiln: `make demo` and `make test` set up everything they need on a fresh Debian 12 machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
APT_PACKAGES := qemu-system-x86 qemu-utils ovmf grub-efi-amd64-bin grub-common grub-emu erofs-utils \
	cryptsetup-bin gdisk fdisk mtools dosfstools genisoimage zstd e2fsprogs kmod binutils debootstrap \
	systemd apt dpkg debian-archive-keyring python3-minimal python3-venv docker-registry skopeo umoci busybox-static \
	containerd runc etcd-server etcd-client openssl chromium sbsigntool faketime gpgv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup apt venv demo test test-unit test-vm lint bench clean

setup: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "==> installing system packages:" $$missing; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "==> creating the virtualenv"
	python3 -m venv --clear $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(SUDO) $(KILN) build --output build/demo
	$(SUDO) $(KILN) run build/demo --headless --serial-log build/demo/serial.log

# The whole suite, VM tests included. pytest's exit code 5 (nothing collected) fails too.
test: setup lint
	$(SUDO) $(PY) -m pytest -p no:cacheprovider --durations=30 tests; rc=$$?; \
	if [ $$rc = 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

test-unit: setup
	$(SUDO) $(PY) -m pytest -p no:cacheprovider -m 'not vm' tests

test-vm: setup
	$(SUDO) $(PY) -m pytest -p no:cacheprovider -m vm tests

lint: venv
	$(VENV)/bin/ruff check src tests bench migrations
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(SUDO) $(PY) bench/build_time.py
	$(SUDO) $(PY) bench/boot_time.py
	$(SUDO) $(PY) bench/api_latency.py
	$(SUDO) $(PY) bench/guest_api.py
	$(SUDO) $(PY) bench/update.py
	$(SUDO) $(PY) bench/containers.py
	$(SUDO) $(PY) bench/fleet.py --guest
	$(SUDO) $(PY) bench/secure_boot.py
	$(SUDO) $(PY) bench/fleet_simulate.py
	$(SUDO) $(PY) bench/fleet_view.py
	$(PY) bench/report.py

clean:
	rm -rf build
