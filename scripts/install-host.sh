#!/usr/bin/env bash
# Set up a gpunexus host on Debian or Ubuntu, as a systemd service.
#
#   sudo scripts/install-host.sh --model tiny                      # CPU, reference model, this checkout
#   sudo scripts/install-host.sh --model tiny --model tiny-chat    # several models, the same flags for each
#   sudo scripts/install-host.sh --config host.toml                # several models, one [[model]] table each
#   sudo scripts/install-host.sh --source ./gpunexus-checkout --model llama3.1:8b \
#        --backend openai --upstream http://127.0.0.1:11434/v1 --price 0.15 \
#        --hub https://hub.example --api-key gnx_...
#   sudo scripts/install-host.sh --docker --image gpunexus-host:latest ...
#   scripts/install-host.sh --dry-run ...                          # print every step, change nothing
#
# Each step checks before it acts and says "already" when there is nothing to
# do, so a second run changes nothing. Run with --help for every option.
set -euo pipefail

PREFIX=/opt/gpunexus
VENV=$PREFIX/venv
SOURCE_STAMP=$PREFIX/installed-from  # what the venv was installed from: a second run compares
STATE=/var/lib/gpunexus                # $GPUNEXUS_HOME: identity key, control file, receipts
ENV_FILE=/etc/gpunexus/host.env
CONFIG_FILE=/etc/gpunexus/host.toml    # --config: the models the service serves
UNIT=gpunexus-host.service
UNIT_FILE=/etc/systemd/system/$UNIT
CTL=/usr/local/bin/gpunexus-host       # `gpunexus-host status|disable|enable` for the service's host
USER_NAME=gpunexus
DOCKER_VOLUME=gpunexus-host
DOCKER_NAME=gpunexus-host
STOP_TIMEOUT=600  # seconds a stop may take to let the answers in flight finish

usage() {
    cat <<'EOF'
Usage: install-host.sh [options]

What to serve:
  --model NAME          model name announced to gateways (default: tiny, the reference model);
                        repeatable: one peer serves each, with the same flags
  --config FILE         serve the models of this host.toml instead (one [[model]] table per
                        model, see 'gpunexus node serve --help'): installed as
                        /etc/gpunexus/host.toml (mode 640); the flags below are its defaults
  --backend NAME        reference | openai | exllamav2 (default: reference)
  --upstream URL        --backend openai: the OpenAI-compatible server (Ollama, vLLM, ...)
  --upstream-model NAME --backend openai: its model name, if not --model
  --model-dir DIR       --backend exllamav2: the EXL2 model folder
  --price USD           asking price per million tokens, or 'market' with --hub (default: 0.20)
  --listen MULTIADDR    libp2p listen address (default: /ip4/0.0.0.0/tcp/4001)
  --hub URL --api-key KEY   register with a hub (the key goes to /etc/gpunexus/host.env, mode 600)

How to install:
  --source PATH|SPEC    a gpunexus checkout, or a pip requirement such as 'gpunexus==0.1.0'
                        (default: the checkout this script is in)
  --docker              run the container image instead of a virtual environment
  --image TAG           the image for --docker (default: gpunexus-host:latest; built from
                        --source PATH with docker/host.Dockerfile when absent)
  --require-gpu         stop when no NVIDIA driver is found (default: warn, serve on the CPU)
  --skip-check          do not stop when `gpunexus node check` fails
  --dry-run             print every step and change nothing
  -h, --help            this text
EOF
}

# --- output: every step says what it did, would do, or found already done ----
changes=0
dry_run=0
step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
already() { printf '    already: %s\n' "$*"; }
warn() { printf '    WARNING: %s\n' "$*"; }  # on stdout: in order with the steps
die() { printf 'install-host.sh: %s\n' "$*" >&2; exit 1; }

# act DESCRIPTION CMD...: run a command that changes the system (or show it under --dry-run).
act() {
    local what=$1; shift
    changes=$((changes + 1))
    if ((dry_run)); then
        printf '    would %s: %s\n' "$what" "$*"
    else
        printf '    %s\n' "$what"
        "$@"
    fi
}

# put_file PATH MODE OWNER:GROUP CONTENT [SHOWN]: write a file unless it already has
# that content, mode and owner; sets file_changed. (Never call it as a condition:
# bash turns errexit off inside a function called from `if` or `&&`.)
file_changed=0
put_file() {
    local path=$1 mode=$2 owner=$3 content=$4 shown=${5:-$4}
    file_changed=0
    if [[ -f $path ]] && [[ $(cat "$path") == "$content" ]] \
        && [[ $(stat -c '%a %U:%G' "$path") == "$mode $owner" ]]; then
        already "$path is up to date"
        return 0
    fi
    file_changed=1
    changes=$((changes + 1))
    if ((dry_run)); then
        printf '    would write %s (mode %s, %s):\n' "$path" "$mode" "$owner"
        local line
        while IFS= read -r line; do printf '        | %s\n' "$line"; done <<<"$shown"
        return 0
    fi
    mkdir -p "$(dirname "$path")"
    # Written aside, then moved: the service never reads half a file, and the
    # mode is set before the content (a key) is in it.
    local tmp
    tmp=$(mktemp "$path.XXXXXX")
    chmod "$mode" "$tmp"
    chown "$owner" "$tmp"
    printf '%s\n' "$content" >"$tmp"
    mv -f "$tmp" "$path"
    note "wrote $path (mode $mode, $owner)"
}

# A value that lands in a systemd ExecStart line or an env file: no spaces,
# quotes, '$' or '%' (systemd would expand those).
safe_word() {
    [[ $2 =~ ^[A-Za-z0-9._:/@+=,~-]+$ ]] || die "$1 '$2' has characters that cannot go into a systemd unit"
}

# --- options -------------------------------------------------------------------
models=() config="" backend=reference backend_given=0 upstream="" upstream_model="" model_dir=""
price=0.20 listen=/ip4/0.0.0.0/tcp/4001 hub="" api_key=""
source="" docker=0 image=gpunexus-host:latest require_gpu=0 skip_check=0

# A parse-only look at --config before anything changes: TOML, [[model]] tables
# only, each with an id. (Python's tomllib where python3 is 3.11 or newer; on a
# system without it, `gpunexus node check --config` below is the first look.)
# The full check (every key and value) is `node check`'s, before the file is installed.
CONFIG_SYNTAX_PY='
import sys, tomllib
path = sys.argv[1]
try:
    with open(path, "rb") as f:
        data = tomllib.load(f)
except tomllib.TOMLDecodeError as exc:
    sys.exit(f"--config {path} is not valid TOML: {exc}")
tables = data.get("model")
if set(data) - {"model"} or not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
    sys.exit(f"--config {path}: the file holds [[model]] tables only, at least one (id = \"tiny\", backend = \"reference\", ...)")
for i, table in enumerate(tables, 1):
    if not isinstance(table.get("id"), str) or not table["id"].strip():
        sys.exit(f"--config {path}: [[model]] #{i} has no id (the public model name, e.g. id = \"tiny\")")
ids = [t["id"] for t in tables]
print(", ".join(ids))
'

config_models=""  # the ids the --config file names, for the messages
check_config_syntax() {
    if command -v python3 >/dev/null && python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        config_models=$(python3 -c "$CONFIG_SYNTAX_PY" "$config" 2>&1) \
            || die "$config_models (nothing was changed)"
    fi
}

# What the host serves, in words; `models_label unit` leaves out the ids a
# --config file gives (text from a file never goes into the unit).
models_label() {
    if [[ -n $config ]]; then
        if [[ ${1:-} == unit ]]; then echo "the models of $CONFIG_FILE"; return; fi
        echo "the models of $CONFIG_FILE${config_models:+ ($config_models)}"
    else
        local joined
        joined=$(IFS=,; echo "${models[*]}")
        echo "${joined//,/, }"
    fi
}

parse_args() {
    while (($#)); do
        case $1 in
            --model) models+=("${2:?--model needs a value}"); shift ;;
            --config) config=${2:?--config needs a file}; shift ;;
            --backend) backend=${2:?--backend needs a value}; backend_given=1; shift ;;
            --upstream) upstream=${2:?--upstream needs a URL}; shift ;;
            --upstream-model) upstream_model=${2:?--upstream-model needs a value}; shift ;;
            --model-dir) model_dir=${2:?--model-dir needs a folder}; shift ;;
            --price) price=${2:?--price needs a value}; shift ;;
            --listen) listen=${2:?--listen needs a multiaddr}; shift ;;
            --hub) hub=${2:?--hub needs a URL}; shift ;;
            --api-key) api_key=${2:?--api-key needs a key}; shift ;;
            --source) source=${2:?--source needs a path or a pip requirement}; shift ;;
            --docker) docker=1 ;;
            --image) image=${2:?--image needs a tag}; shift ;;
            --require-gpu) require_gpu=1 ;;
            --skip-check) skip_check=1 ;;
            --dry-run) dry_run=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "unknown option: $1" ;;
        esac
        shift
    done
    case $backend in
        reference | exllamav2) ;;
        openai) [[ -n $upstream ]] || die "--backend openai needs --upstream URL (e.g. http://127.0.0.1:11434/v1 for Ollama)" ;;
        *) die "--backend must be reference, openai or exllamav2, not '$backend'" ;;
    esac
    if [[ -n $config ]]; then
        ((${#models[@]} == 0)) || die "--config and --model both name models: give the models in one place"
        ((!docker)) || die "--config is not supported with --docker yet: give the models as --model flags"
        [[ -z $upstream_model && -z $model_dir ]] \
            || die "--upstream-model and --model-dir name one model's files: put them in the [[model]] tables of $config"
        [[ -f $config && -r $config ]] || die "--config $config: no such readable file"
        config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
        check_config_syntax
    else
        ((${#models[@]})) || models=(tiny)
        if ((${#models[@]} > 1)) && [[ -n $upstream_model || -n $model_dir ]]; then
            die "--upstream-model and --model-dir name one model's files, but --model is given ${#models[@]} times: use --config host.toml with one [[model]] table each"
        fi
        [[ $backend != exllamav2 || -n $model_dir ]] || die "--backend exllamav2 needs --model-dir DIR"
    fi
    [[ -z $hub && -z $api_key ]] || [[ -n $hub && -n $api_key ]] || die "--hub and --api-key go together"
    [[ $price != market || -n $hub ]] || die "--price market needs --hub: market prices come from the hub"
    local name value
    for value in "${models[@]}"; do safe_word --model "$value"; done
    for name in price listen upstream upstream_model model_dir hub api_key image; do
        value=${!name}
        [[ -z $value ]] || safe_word "--${name//_/-}" "$value"
    done
    if [[ -z $source ]]; then
        # Run from a checkout: install that checkout (never guess a name on PyPI).
        source=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
        grep -qs '^name = "gpunexus"' "$source/pyproject.toml" \
            || die "give --source PATH (a gpunexus checkout) or --source 'gpunexus==VERSION' (a pip requirement)"
    fi
    if [[ -d $source ]]; then source=$(cd "$source" && pwd); fi
}

# --- 1. the system ---------------------------------------------------------------
check_system() {
    step "system"
    local id="" like="" pretty=""
    if [[ -r /etc/os-release ]]; then
        # shellcheck disable=SC1091  # the running system's own file
        id=$(. /etc/os-release && echo "${ID:-}")
        # shellcheck disable=SC1091
        like=$(. /etc/os-release && echo "${ID_LIKE:-}")
        # shellcheck disable=SC1091
        pretty=$(. /etc/os-release && echo "${PRETTY_NAME:-$ID}")
    fi
    case " $id $like " in
        *" debian "* | *" ubuntu "*) ;;
        *) die "unsupported system: ${pretty:-unknown (no /etc/os-release)}; this script supports Debian and Ubuntu (use the container image elsewhere)" ;;
    esac
    local arch
    arch=$(uname -m)
    case $arch in
        x86_64 | aarch64) ;;
        *) die "unsupported architecture: $arch; gpunexus hosts run on x86_64 or aarch64" ;;
    esac
    # /run/systemd/system exists only when systemd is PID 1 (sd_booted).
    if [[ ! -d /run/systemd/system ]] || ! command -v systemctl >/dev/null; then
        die "systemd is not running here; the host is installed as a systemd service (in a container, run the image instead)"
    fi
    note "$pretty, $arch, systemd"
    if ((!dry_run && EUID != 0)); then die "run as root (sudo), or with --dry-run to see the steps"; fi
}

# --- 2. the GPU ------------------------------------------------------------------
gpu=""
check_gpu() {
    step "GPU"
    if command -v nvidia-smi >/dev/null && gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null) && [[ -n $gpu ]]; then
        note "NVIDIA driver found: ${gpu//$'\n'/; }"
        [[ $backend != reference ]] || note "(to use it: --backend exllamav2 --model-dir DIR, or --backend openai with a local server)"
        return
    fi
    gpu=""
    ((!require_gpu)) || die "no working NVIDIA driver (nvidia-smi) and --require-gpu was given: install the driver first"
    [[ $backend != exllamav2 ]] || die "--backend exllamav2 needs an NVIDIA GPU, and no working nvidia-smi was found"
    warn "no NVIDIA driver (nvidia-smi): CPU mode, the $backend backend"
    ((backend_given)) || note "(the reference model runs on any CPU; --backend openai forwards to a server you run)"
}

# --- 3. packages -------------------------------------------------------------------
installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }

check_packages() {
    step "packages"
    local wanted=(ca-certificates) missing=() pkg
    if ((docker)); then
        command -v docker >/dev/null || wanted+=(docker.io)
    else
        # libp2p's fastecdsa may have to compile: a compiler and GMP's headers.
        wanted+=(python3 python3-venv python3-dev gcc libc6-dev libgmp-dev)
    fi
    for pkg in "${wanted[@]}"; do installed "$pkg" || missing+=("$pkg"); done
    if ((${#missing[@]} == 0)); then
        already "installed: ${wanted[*]}"
    else
        act "update the package lists" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        act "install ${missing[*]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    if ((!docker)) && command -v python3 >/dev/null \
        && ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2); gpunexus needs 3.11 or newer (Debian 12, Ubuntu 24.04), or use --docker"
    fi
}

# --- 4. the service user and its state folder ------------------------------------------
check_user() {
    step "user $USER_NAME"
    if id "$USER_NAME" >/dev/null 2>&1; then
        already "system user $USER_NAME exists"
    else
        act "create system user $USER_NAME" useradd --system --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
    fi
    if ((docker)); then note "state: docker volume $DOCKER_VOLUME"; return; fi
    if [[ -d $STATE ]] && [[ $(stat -c '%a %U' "$STATE") == "700 $USER_NAME" ]]; then
        already "$STATE (mode 700, $USER_NAME) holds the host's identity and state"
    else
        act "create $STATE (mode 700) for the host's identity and state" install -d -m 0700 -o "$USER_NAME" -g "$USER_NAME" "$STATE"
    fi
}

# --- 5. gpunexus itself: a virtual environment, or the image ----------------------------
# What the install is made from, as a line to compare: a checkout by the hash of
# its files (not build outputs), a pip requirement by its text.
source_id() {
    if [[ -d $source ]]; then
        local sum
        sum=$(cd "$source" && find . -type f \
                  -not -path './.git/*' -not -path './.venv/*' -not -path '*/__pycache__/*' \
                  -not -path './build/*' -not -path '*.egg-info/*' -not -path './.hypothesis/*' \
                  -not -path './.pytest_cache/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum)
        echo "path $source sha256:${sum%% *}"
    else
        echo "pip $source"
    fi
}

check_install() {
    if ((docker)); then check_image; return; fi
    step "gpunexus in $VENV"
    if [[ -x $VENV/bin/python ]]; then
        already "virtual environment $VENV exists"
    else
        act "create the virtual environment $VENV" python3 -m venv "$VENV"
        # Debian's bundled pip is old and, without wheel, falls back to setup.py installs.
        act "bring its pip and wheel up to date" "$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip wheel
    fi
    local want
    want=$(source_id)
    if [[ -f $SOURCE_STAMP ]] && [[ $(cat "$SOURCE_STAMP") == "$want" ]] && [[ -x $VENV/bin/gpunexus ]]; then
        already "gpunexus $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("gpunexus"))') installed from $source"
        return
    fi
    act "install gpunexus from $source" "$VENV/bin/pip" install --quiet --disable-pip-version-check "$source"
    if ((!dry_run)); then
        printf '%s\n' "$want" >"$SOURCE_STAMP"
        "$VENV/bin/gpunexus" --help >/dev/null
    fi
}

check_image() {
    step "image $image"
    if ((!dry_run)) || command -v docker >/dev/null; then
        if docker image inspect "$image" >/dev/null 2>&1; then
            already "image $image is present"
            return
        fi
    fi
    [[ -d $source && -f $source/docker/host.Dockerfile ]] \
        || die "image $image is absent: load it (docker load) or give --source PATH of a gpunexus checkout to build it"
    act "build the base image" "$source/docker/make-base.sh"
    act "build $image" docker build --force-rm -f "$source/docker/host.Dockerfile" -t "$image" "$source"
    local others
    if others=$(docker ps --format '{{.Names}}' 2>/dev/null | grep -vx "$DOCKER_NAME") && [[ -n $others ]]; then
        warn "other containers run on this machine and share its GPU and network: ${others//$'\n'/, }"
    fi
}

# How gpunexus runs, as the service user: a venv binary, or a throwaway container.
serve_args() {
    local args=(node serve) name
    if [[ -n $config ]]; then args+=(--config "$CONFIG_FILE"); fi
    for name in "${models[@]}"; do args+=(--model "$name"); done
    args+=(--backend "$backend" --price "$price" --listen "$listen")
    [[ -z $upstream ]] || args+=(--upstream "$upstream")
    [[ -z $upstream_model ]] || args+=(--upstream-model "$upstream_model")
    [[ -z $model_dir ]] || args+=(--model-dir "$model_dir")
    # systemd fills in ${GPUNEXUS_HUB}; the key reaches gpunexus as $GPUNEXUS_API_KEY, never on a command line.
    # shellcheck disable=SC2016
    [[ -z $hub ]] || args+=(--hub '${GPUNEXUS_HUB}')
    echo "${args[*]}"
}

# `docker run ...` for the service and the one-off steps: host network (libp2p
# announces the machine's own addresses), read-only root, no capabilities,
# state in a named volume. Only exllamav2 needs the GPU inside (an image built
# on CUDA, and the NVIDIA Container Toolkit): openai forwards to a server outside.
docker_run() {
    local run
    run="$(command -v docker || echo /usr/bin/docker) run --rm --network host --read-only --tmpfs /tmp"
    run+=" --cap-drop ALL --security-opt no-new-privileges -v $DOCKER_VOLUME:$STATE"
    [[ $backend != exllamav2 ]] || run+=" --gpus all"
    echo "$run"
}

as_host() {  # run gpunexus (or its python) the way the service will
    if ((docker)); then
        # shellcheck disable=SC2046  # docker_run prints words on purpose
        $(docker_run) -i "$image" "$@"
    else
        runuser -u "$USER_NAME" -- env GPUNEXUS_HOME="$STATE" "$VENV/bin/gpunexus" "$@"
    fi
}

# --- 6. the hardware check --------------------------------------------------------------
check_model() {
    step "check: $(models_label) on the $backend backend (changes nothing)"
    local args=(node check) name shown
    for name in "${models[@]}"; do args+=(--model "$name"); done
    args+=(--backend "$backend")
    [[ -z $upstream ]] || args+=(--upstream "$upstream")
    [[ -z $upstream_model ]] || args+=(--upstream-model "$upstream_model")
    [[ -z $model_dir ]] || args+=(--model-dir "$model_dir")
    shown="gpunexus ${args[*]}${config:+ --config <(cat $config)}"
    if ((dry_run)); then note "would run: $shown"; return; fi
    local rc=0
    if [[ -n $config ]]; then
        # The service user may not read the file where it is (nor reopen root's pipe as
        # /dev/stdin): the file goes in on stdin, and a pipe of its own carries it on.
        # shellcheck disable=SC2016  # expanded by that user's bash
        runuser -u "$USER_NAME" -- env GPUNEXUS_HOME="$STATE" bash -c '"$0" "$@" --config <(cat)' "$VENV/bin/gpunexus" "${args[@]}" \
            <"$config" 2>&1 | sed 's/^/    | /' || rc=${PIPESTATUS[0]}
    else
        as_host "${args[@]}" 2>&1 | sed 's/^/    | /' || rc=${PIPESTATUS[0]}
    fi
    case $rc in
        0) return ;;
        2) die "$shown refused the models as given (see above): nothing was installed for them${config:+; fix $config and rerun}" ;;
    esac
    ((skip_check)) || die "gpunexus node check failed: this machine cannot serve $(models_label) as asked (--skip-check installs anyway)"
    warn "the check failed; installing anyway (--skip-check)"
}

# --config: the file the service reads, readable by its user and no one else.
check_config_file() {
    if [[ -z $config ]]; then
        # The models are --model flags now: a file the unit no longer reads would mislead.
        if [[ -e $CONFIG_FILE ]]; then act "remove $CONFIG_FILE (the unit names its models with --model now)" rm -f "$CONFIG_FILE"; fi
        return 0
    fi
    step "models in $CONFIG_FILE"
    local content shown
    content=$(cat "$config")
    # A dry run shows the file, but not an upstream's bearer key.
    shown=$(sed -E 's/^([[:space:]]*upstream_key[[:space:]]*=).*/\1 <upstream key>/' <<<"$content")
    put_file "$CONFIG_FILE" 640 "$USER_NAME:$USER_NAME" "$content" "$shown"
}

# --- 7. the hub, and the service's environment -----------------------------------------------
REGISTER_PY='
import os, sys, trio
from gpunexus.node.hub_client import HostHubLink
from gpunexus.node.runtime import load_identity

async def main() -> None:
    signer = load_identity(os.environ["GPUNEXUS_HOME"], "host")  # the identity the service will use
    link = HostHubLink(sys.argv[1], sys.stdin.read().strip(), signer)
    try:
        print(f"registered host {signer.peer_id} with hub {await link.connect()}")
    except Exception as exc:  # HubRefused (bad key, peer id taken), HubUnavailable
        sys.exit(f"cannot register with the hub: {exc}")
    finally:
        await link.aclose()

trio.run(main)
'

check_hub_and_env() {
    step "hub and $ENV_FILE"
    local content="# gpunexus-host.service's environment (written by install-host.sh; mode 600: it may hold a key)
GPUNEXUS_HOME=$STATE"
    if [[ -n $hub ]]; then
        content+="
GPUNEXUS_HUB=$hub
GPUNEXUS_API_KEY=$api_key"
        if [[ -f $ENV_FILE ]] && [[ $(cat "$ENV_FILE") == "$content" ]]; then
            already "registered with $hub with this key"
        elif ((dry_run)); then
            changes=$((changes + 1))
            note "would register this host's peer id with $hub"
        else
            note "registering with $hub"
            # The key travels on stdin, not in argv where `ps` would show it.
            local python
            if ((docker)); then
                # shellcheck disable=SC2207  # docker_run prints words on purpose
                python=($(docker_run) -i -e GPUNEXUS_HOME="$STATE" --entrypoint python "$image")
            else
                python=(runuser -u "$USER_NAME" -- env GPUNEXUS_HOME="$STATE" "$VENV/bin/python")
            fi
            printf '%s' "$api_key" | "${python[@]}" -c "$REGISTER_PY" "$hub" | sed 's/^/    /' \
                || die "could not register with $hub (nothing written; fix the URL or key and rerun)"
            changes=$((changes + 1))
        fi
    fi
    local shown=$content
    [[ -z $api_key ]] || shown=${content//"$api_key"/<api key>}
    put_file "$ENV_FILE" 600 root:root "$content" "$shown"
}

# --- 8. the control command and the systemd unit ------------------------------------------
check_control_command() {
    step "control command $CTL"
    local run
    if ((docker)); then
        run="exec docker exec $DOCKER_NAME gpunexus node \"\$@\""
    else
        run="exec runuser -u $USER_NAME -- env GPUNEXUS_HOME=$STATE $VENV/bin/gpunexus node \"\$@\""
    fi
    put_file "$CTL" 755 root:root "#!/bin/sh
# gpunexus-host status | disable | enable: steer the host that $UNIT runs.
# disable finishes the requests in flight, then withdraws the offer (take the GPU back).
$run"
}

unit_text() {
    local exec_start exec_extra="" user_extra=""
    if ((docker)); then
        exec_start="$(docker_run) --name $DOCKER_NAME -e GPUNEXUS_HUB -e GPUNEXUS_API_KEY $image $(serve_args)"
        exec_extra="ExecStartPre=-$(command -v docker || echo /usr/bin/docker) rm -f $DOCKER_NAME
ExecStop=$(command -v docker || echo /usr/bin/docker) stop -t $STOP_TIMEOUT $DOCKER_NAME"
        user_extra="SupplementaryGroups=docker"
    else
        exec_start="$VENV/bin/gpunexus $(serve_args)"
        exec_extra="NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths=$STATE"
    fi
    cat <<EOF
# Written by gpunexus scripts/install-host.sh; rerun it to change the settings.
[Unit]
Description=gpunexus host: $(models_label unit) on the $backend backend
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
User=$USER_NAME
Group=$USER_NAME
${user_extra:+$user_extra
}EnvironmentFile=$ENV_FILE
ExecStart=$exec_start
$exec_extra
Restart=on-failure
RestartSec=5
# Stopping sends SIGTERM: the host takes no new orders, lets those in flight
# finish (up to TimeoutStopSec), withdraws its offer and exits 0.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=$((STOP_TIMEOUT + 30))

[Install]
WantedBy=multi-user.target
EOF
}

check_service() {
    step "service $UNIT"
    put_file "$UNIT_FILE" 644 root:root "$(unit_text)"
    if ((file_changed)); then act "reload systemd" systemctl daemon-reload; fi
    if systemctl is-enabled --quiet "$UNIT" 2>/dev/null; then
        already "$UNIT is enabled at boot"
    else
        act "enable $UNIT at boot" systemctl enable --quiet "$UNIT"
    fi
    if ! systemctl is-active --quiet "$UNIT" 2>/dev/null; then
        act "start $UNIT" systemctl start "$UNIT"
    elif ((changes > 0)); then
        act "restart $UNIT (it drains first) with the new settings" systemctl restart "$UNIT"
    else
        already "$UNIT is running"
    fi
}

main() {
    parse_args "$@"
    ((!dry_run)) || printf 'dry run: nothing will be changed\n'
    check_system
    check_gpu
    check_packages
    check_user
    check_install
    check_model
    check_hub_and_env
    check_config_file
    check_control_command
    check_service
    if ((changes == 0)); then
        printf '\nnothing to change: every step was already done\n'
    elif ((dry_run)); then
        printf '\ndry run: %d change(s) would be made\n' "$changes"
    else
        printf '\ndone: %d change(s). See "systemctl status %s" and "journalctl -u %s -f"; "sudo %s disable" takes the GPU back.\n' \
            "$changes" "$UNIT" "$UNIT" "$CTL"
    fi
}

# Sourced (for a test of one step), it only defines the functions.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
