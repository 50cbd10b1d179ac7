# packaging/install.mk: included by the top-level Makefile (`include packaging/install.mk`).
#
#   make install                       build a wheel, install under / (venv, units, config)
#   make install PREFIX=/tmp/root      stage into a directory instead
#   make install INSTALL_ARGS=--enable also enable the units (systemctl [--root])
#
# The wheel is built with --no-isolation from the dev venv (setuptools + wheel),
# so this works without reaching a package index. install.sh itself still needs
# an index or EC2_AGENT_PIP_ARGS="--no-index --find-links DIR" for the agent's
# runtime dependencies.
PREFIX ?= /
INSTALL_ARGS ?=
WHEEL_DIR ?= build/wheel

.PHONY: wheel install

wheel: venv
	rm -rf $(WHEEL_DIR)
	$(BIN)/python -m build --wheel --no-isolation --outdir $(WHEEL_DIR) .

install: wheel
	sh packaging/install.sh $(INSTALL_ARGS) --wheel "$$(ls $(WHEEL_DIR)/ec2_agent-*.whl)" $(PREFIX)
