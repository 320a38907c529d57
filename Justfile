# exai-runtime: every command sets up what it needs first, so a fresh clone needs only
# Python 3.11+ and `pip install rust-just` (1.54 or newer: `serve` uses the `[continue]` attribute).

set shell := ["bash", "-euo", "pipefail", "-c"]
# Recipe arguments reach commands as "$@", each one intact (quotes, spaces, `&`, `$`): `{{ARGS}}`
# would paste them into the command line, where the shell splits and interprets them again.
set positional-arguments

python := env_var_or_default("PYTHON", "python3")
venv := ".venv"
bin := venv / "bin"
clients := ".venv-clients"
# setuptools reports how it made the editable install as a warning, though it is information
# for the user (pypa/packaging-problems#558): that module's warnings alone are not shown, so
# a deprecation or an error of the build still is.
quiet_build := "PYTHONWARNINGS=ignore::UserWarning:setuptools.command.editable_wheel"

# Run the MCP server on an embedded Postgres (flags are passed to `exai serve`). Ctrl-C reaches
# just too; `[continue]` makes it exit as the server does (0 after a clean stop), not with 130.
[continue]
serve *ARGS: setup
    @{{bin}}/exai serve "$@"

# Set up, then run the whole test suite (pytest arguments are passed through).
test *ARGS: setup setup-clients
    {{bin}}/python -m pytest "$@"

# Ruff (lint and format check) and mypy.
lint: setup
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
    {{bin}}/mypy

# Rewrite files to the project's format and fix what ruff can fix.
fmt: setup
    {{bin}}/ruff format .
    {{bin}}/ruff check --fix .

# Create .venv and install the project with its dev tools; reinstall only when pyproject changes.
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x {{bin}}/python ]; then
        {{python}} -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || { echo "exai-runtime needs Python 3.11+ (set PYTHON=...)" >&2; exit 1; }
        {{python}} -m venv {{venv}}
    fi
    stamp={{venv}}/.installed
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        {{bin}}/python -m pip install --quiet --upgrade pip
        {{quiet_build}} {{bin}}/python -m pip install --quiet -e '.[dev]'
        echo "$want" > "$stamp"
    fi

# Real MCP clients used by the tests, each in its own environment so they never constrain ours.
# Python clients: one venv per tests/clients/requirements-<name>.txt. The TypeScript SDK: npm ci
# of tests/clients/package(-lock).json into .venv-clients/node, when Node.js is installed.
setup-clients:
    #!/usr/bin/env bash
    set -euo pipefail
    for req in tests/clients/requirements-*.txt; do
        name=$(basename "$req" .txt); name=${name#requirements-}
        env={{clients}}/$name
        want=$(sha256sum "$req" | cut -d' ' -f1)
        if [ "$(cat "$env/.installed" 2>/dev/null)" != "$want" ]; then
            {{python}} -m venv "$env"
            "$env/bin/python" -m pip install --quiet -r "$req"
            echo "$want" > "$env/.installed"
        fi
    done
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        echo "setup-clients: node/npm not found: the TypeScript SDK client test will be skipped" >&2
        exit 0
    fi
    # The TypeScript clients (tests/clients) and the third-party servers exai proxies in
    # tests (tests/servers), each in its own env.
    for pair in clients:node servers:servers-node; do
        src=tests/${pair%%:*}; env={{clients}}/${pair##*:}
        want=$(cat "$src/package.json" "$src/package-lock.json" | sha256sum | cut -d' ' -f1)
        if [ "$(cat "$env/.installed" 2>/dev/null)" != "$want" ]; then
            # npm installs next to package.json, so the manifest and lock are copied there.
            rm -rf "$env" && mkdir -p "$env"
            cp "$src/package.json" "$src/package-lock.json" "$env/"
            (cd "$env" && npm ci --silent --no-audit --no-fund)
            echo "$want" > "$env/.installed"
        fi
    done

# End-to-end benchmark against the floor and the SDK servers: `just bench` (quick, < 3 min),
# `just bench full`, `just bench profile`, `just bench flood` (issue 11: floods, slow readers),
# `just bench durability` (issue 14: each durability mode, the database local and 20 ms away),
# `just bench http` (issue 15: Streamable HTTP, exai beside the SDK 2.x HTTP app),
# `just bench proxy` (issue 16: a stdio MCP server called directly and through exai's [servers]).
# Results go to docs/benchmarks.md (bench/README.md).
bench MODE="quick" *ARGS: setup
    {{bin}}/python -m bench "$@"

# Micro-benchmarks: actor kernel asks (issue 3).
bench-actors *ARGS: setup
    {{bin}}/python -m bench.actors "$@"
