#!/usr/bin/env bash
# Build the base image of docker/host.Dockerfile and docker/hub.Dockerfile
# without pulling from any container registry: debootstrap a minimal Debian
# bookworm from the Debian mirror this machine's apt already uses, then
# `docker import` that root filesystem as gpunexus-base:bookworm.
#
#   docker/make-base.sh [--force] [TAG]      (needs root, debootstrap, docker)
#
# An existing tag is reused unless --force: debootstrap takes a minute or
# two, and the tests call this script before every image build.
set -euo pipefail

force=0
if [[ ${1:-} == --force ]]; then force=1; shift; fi
tag=${1:-gpunexus-base:bookworm}
suite=bookworm
# python3-venv: the project lives in its own venv; ca-certificates: pip and
# the hub client speak HTTPS; tini: a real PID 1 that forwards docker stop's
# SIGTERM to gpunexus (Python as PID 1 would ignore it) and reaps children.
packages=python3,python3-venv,ca-certificates,tini

if ((!force)) && docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag already exists (--force rebuilds it)"
    exit 0
fi
for tool in debootstrap docker; do
    command -v "$tool" >/dev/null || { echo "make-base.sh: $tool is not installed (apt-get install debootstrap docker.io)" >&2; exit 1; }
done
if ((EUID != 0)); then echo "make-base.sh: debootstrap needs root" >&2; exit 1; fi

# The mirror apt uses here (deb822 .sources files or one-line sources.list):
# the first URI that serves the main Debian archive, not debian-security.
mirror=${MIRROR:-}
if [[ -z $mirror ]]; then
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
                 | awk '$1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }'
             grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                 | awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }') || true
    mirror=$(grep -E '/debian/?$' <<<"$mirror" | head -n 1) || true
fi
if [[ -z $mirror ]]; then
    echo "make-base.sh: no Debian mirror found in /etc/apt/sources.list*; set MIRROR=URL" >&2
    exit 1
fi

root=$(mktemp -d /tmp/gpunexus-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap $suite (minbase + $packages) from $mirror into $root"
start=$SECONDS
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# Trust the local CAs this machine trusts (a TLS-inspecting proxy's, a
# company's): pip inside the image builds reaches PyPI through the same network.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
    echo "added this machine's local CAs: $(cd /usr/local/share/ca-certificates && echo ./*.crt)"
fi
# What an image never needs: downloaded .debs, package lists, man pages.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/man/* "$root"/usr/share/doc/*
tar -C "$root" --numeric-owner -c . \
    | docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
          --message "debootstrap $suite minbase from $mirror" - "$tag" >/dev/null
echo "built base image $tag in $((SECONDS - start)) s"
