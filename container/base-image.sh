#!/usr/bin/env bash
# Build the base image offline, from Debian's packages alone: a minimal Debian bookworm root filesystem with
# Debian's Python 3.11 (python3, python3-venv), imported as an image. No image registry is contacted.
#
#   sudo container/base-image.sh                      # -> localhost/siamese-base:bookworm
#   sudo container/base-image.sh my/base:tag          # another tag
#   DEBIAN_MIRROR=http://mirror.example/debian sudo container/base-image.sh
#
# Needs root (debootstrap makes device nodes and chroots), debootstrap, and podman or docker (ENGINE=...).
# Then: podman build --build-arg BASE_IMAGE=localhost/siamese-base:bookworm -t siamese-recognizer .
set -euo pipefail

tag=${1:-localhost/siamese-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
engine=${ENGINE:-$(command -v podman || command -v docker || true)}
[ "$(id -u)" -eq 0 ] || { echo "base-image.sh: run as root (debootstrap needs it)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "base-image.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
[ -n "$engine" ] || { echo "base-image.sh: neither podman nor docker is installed" >&2; exit 2; }

root=$(mktemp -d /var/tmp/siamese-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror"

# The security and update suites, for the images built on this one (apt-get update first: the lists are trimmed).
cat > "$root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
# Keep images built on this one small: no docs, man pages or recommends, and no apt cache left behind.
cat > "$root/etc/dpkg/dpkg.cfg.d/01-trim" <<'TRIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
TRIM
cat > "$root/etc/apt/apt.conf.d/01-trim" <<'TRIM'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -rf /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
TRIM
chroot "$root" apt-get clean
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{man,info,locale,lintian}/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
       "$root"/var/cache/debconf/*-old "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache
rm -f "$root/etc/machine-id" "$root/etc/hostname" "$root/etc/resolv.conf"  # the engine provides these

tar --numeric-owner -C "$root" -c . | "$engine" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$tag"
"$engine" image ls "$tag"
