# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
DEMO_STAMP := $(VENV)/.installed-demo
# Debian packages the tests use, as TOOL:PACKAGE. promtool/prometheus: the rules and a real
# scrape; docker-compose: validates the stack; curl: a client; iptables: the transparent-mode
# test (as root); tmux: `llmtap top` on a terminal; sqlite3: the README's backup command.
# Installed without recommends (no docker.io, no node exporters): only what the tests run.
DEB_TOOLS := prometheus:prometheus promtool:prometheus docker-compose:docker-compose curl:curl \
             iptables:iptables tmux:tmux sqlite3:sqlite3
# (and, when missing, postgresql: the fleet tests run initdb/pg_ctl for a throwaway cluster)

.PHONY: demo test venv debs bench clean

# The demo needs the sidecar and the openai SDK; the tests need the dev tools on top.
$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[demo]'
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Installs the Debian packages only when a tool is missing (needs root or sudo).
debs:
	@missing=""; \
	for pair in $(DEB_TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$tool >/dev/null || case " $$missing " in *" $$pkg "*) ;; *) missing="$$missing $$pkg";; esac; \
	done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages:$$missing (without recommends)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends postgresql; \
	fi

demo: $(DEMO_STAMP)
	$(VENV)/bin/llmtap demo $(DEMO_ARGS)

# Lint, format and layering checks first: they take seconds, the suite takes minutes.
test: $(STAMP) debs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

# The benchmarks drive the proxies with wrk (Debian's).
bench: $(STAMP)
	@command -v wrk >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends wrk; }
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache demo-out
