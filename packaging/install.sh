#!/bin/sh
# Install ec2-agent under PREFIX: a venv at PREFIX/opt/ec2-agent, the command on the
# PATH as PREFIX/usr/local/bin/ec2-agent (a link into the venv), the systemd units in
# PREFIX/etc/systemd/system, and the default PREFIX/etc/ec2-agent/agent.yaml
# if (and only if) there is none. Idempotent: a second run with the same wheel
# changes nothing, and an existing agent.yaml is never touched.
#
# usage: install.sh [--wheel FILE] [--python PY] [--enable] PREFIX
#
#   --wheel FILE   the wheel to install; without it one is built from this
#                  source tree with `pip wheel --no-deps`
#   --python PY    interpreter for the venv (>= 3.10); default $EC2_AGENT_PYTHON or python3
#   --enable       enable the units (systemctl enable, or --root=PREFIX when PREFIX is not /)
#   PREFIX         / for a real install; any other directory to stage a tree
#                  (a venv is not relocatable: run the result from PREFIX)
#
# Environment:
#   EC2_AGENT_PIP_ARGS   extra pip install arguments, e.g. an offline wheelhouse:
#                        "--no-index --find-links /srv/wheelhouse"
#   EC2_AGENT_VENV_ARGS  extra `python -m venv` arguments, e.g. --system-site-packages
set -eu

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)
wheel=""
python=${EC2_AGENT_PYTHON:-python3}
enable=0
prefix=""

while [ $# -gt 0 ]; do
    case "$1" in
        --wheel) wheel=$2; shift 2 ;;
        --wheel=*) wheel=${1#--wheel=}; shift ;;
        --python) python=$2; shift 2 ;;
        --python=*) python=${1#--python=}; shift ;;
        --enable) enable=1; shift ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; exit 2 ;;
        *) [ -z "$prefix" ] || { echo "install.sh: one PREFIX only" >&2; exit 2; }
           prefix=$1; shift ;;
    esac
done
[ -n "$prefix" ] || { echo "usage: install.sh [--wheel FILE] [--python PY] [--enable] PREFIX" >&2; exit 2; }
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
root=${prefix%/}          # "" for /, so "$root/opt" is never "//opt"
venv=$root/opt/ec2-agent
bindir=$root/usr/local/bin
unitdir=$root/etc/systemd/system
confdir=$root/etc/ec2-agent
changed=0

say() { echo "ec2-agent install: $*"; }

"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || {
    echo "install.sh: $python is older than 3.10" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

if [ -z "$wheel" ]; then
    say "building a wheel from $src"
    # shellcheck disable=SC2086
    "$python" -m pip wheel -q --no-deps --disable-pip-version-check ${EC2_AGENT_PIP_ARGS:-} -w "$tmp" "$src"
    wheel=$(ls "$tmp"/ec2_agent-*.whl)
fi
[ -f "$wheel" ] || { echo "install.sh: no wheel at $wheel" >&2; exit 1; }

# 1. The venv. Created once; never recreated over a working one.
if [ ! -x "$venv/bin/python" ]; then
    say "creating venv $venv"
    # shellcheck disable=SC2086
    "$python" -m venv ${EC2_AGENT_VENV_ARGS:-} "$venv"
    changed=1
fi

# 2. The wheel, keyed by its sha256 so the same wheel is not reinstalled and a
#    rebuilt wheel with an unchanged version still is.
stamp=$venv/.ec2-agent-wheel
want="$(sha256sum "$wheel" | cut -d' ' -f1)  $(basename "$wheel")"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    say "installing $(basename "$wheel")"
    pip="$venv/bin/python -m pip install -q --disable-pip-version-check --no-warn-script-location"
    # shellcheck disable=SC2086
    $pip ${EC2_AGENT_PIP_ARGS:-} "$wheel"
    # shellcheck disable=SC2086
    $pip --force-reinstall --no-deps ${EC2_AGENT_PIP_ARGS:-} "$wheel"
    printf '%s\n' "$want" > "$stamp.new" && mv "$stamp.new" "$stamp"
    changed=1
fi

# 2b. The command on the PATH: operators type `ec2-agent status`. The link's target is
#     the path on the installed system (not under a staging PREFIX). A file there that is
#     not a link is someone else's: left alone, and said so.
target=/opt/ec2-agent/bin/ec2-agent
link=$bindir/ec2-agent
if [ -L "$link" ] || [ ! -e "$link" ]; then
    if [ "$(readlink "$link" 2>/dev/null || true)" != "$target" ]; then
        mkdir -p "$bindir"
        ln -sfn "$target" "$link.new.$$" && mv -f "$link.new.$$" "$link"
        say "linked $link -> $target"
        changed=1
    fi
else
    say "left $link alone: it is not a link (run $target directly)"
fi

# copy_if_changed SRC DEST MODE: write DEST only when its content differs.
copy_if_changed() {
    if ! cmp -s "$1" "$2"; then
        mkdir -p "$(dirname "$2")"
        cp "$1" "$2.new.$$" && chmod "$3" "$2.new.$$" && mv "$2.new.$$" "$2"
        say "wrote $2"
        changed=1
        return 0
    fi
    return 1
}

# 3. The units.
units_changed=0
for unit in "$here"/systemd/*.service "$here"/systemd/*.target; do
    if copy_if_changed "$unit" "$unitdir/$(basename "$unit")" 0644; then
        units_changed=1
    fi
done

# 4. Default config, only when absent: an operator's or packer's file wins.
if [ ! -e "$confdir/agent.yaml" ]; then
    copy_if_changed "$here/config/agent.yaml" "$confdir/agent.yaml" 0644 || true
fi

# 5. systemd: reload a running manager; enable when asked.
if [ -z "$root" ] && [ "$units_changed" = 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
if [ "$enable" = 1 ]; then
    for u in ec2-agent-boot.service ec2-agent.service ec2-agent.target; do
        if [ -z "$root" ]; then
            systemctl is-enabled -q "$u" 2>/dev/null || { systemctl enable -q "$u"; changed=1; }
        else
            systemctl --root="$root" is-enabled -q "$u" 2>/dev/null \
                || { systemctl --root="$root" enable -q "$u"; changed=1; }
        fi
    done
fi

if [ "$changed" = 1 ]; then say "done: $root/"; else say "nothing to do: $root/ is up to date"; fi
