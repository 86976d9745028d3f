# Two commands: `make demo` runs the multi-device demo, `make test` runs the tests.
.PHONY: setup setup-test setup-bench demo test test-fast bench
setup:
	bash scripts/setup.sh run
setup-test:
	bash scripts/setup.sh test
demo: setup
	.venv/bin/detransformer-edge demo
test: setup-test
	.venv/bin/python -m pytest
test-fast: setup-test
	.venv/bin/python -m pytest -m "not slow"
setup-bench:
	bash scripts/setup.sh bench
bench: setup-bench  # needs root: network namespaces, tc and cgroups
	.venv/bin/detransformer-edge bench --quick
