#!/usr/bin/env bash
# Build the built-in `default` guest image: a read-only erofs filesystem with
# Debian's static busybox, the sandbox init, the guest proxies, `fetch`,
# `vsock-stream` and `sandbox-probe`.
#
#   rootfs/build-default.sh           build if needed, print the image path
#
# Cached like the kernel: $SANDBOX_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/sandbox)
# holds images/default-<key>.erofs, <key> hashing every file that goes in, and
# images/default.erofs links to the newest.
#
# erofs, not ext4: the image is never written, erofs is made for read-only
# images (compact metadata, no journal to replay), and mkfs.erofs builds it
# from a directory without root loop mounts. It is left uncompressed: in the
# guest, decompression is kernel code, which is slow where it is emulated.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${SANDBOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandbox}"
log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }

need_pkg() { # package, file it provides
    [ -e "$2" ] && return
    [ "$(id -u)" -eq 0 ] || die "missing package $1; run: sudo apt-get install $1"
    log "installing $1"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null
}
need_pkg busybox-static /bin/busybox
need_pkg erofs-utils /usr/bin/mkfs.erofs
need_pkg musl-tools /usr/bin/musl-gcc

target=x86_64-unknown-linux-musl
rustup target list --installed 2>/dev/null | grep -qx "$target" || {
    log "adding the Rust target $target"
    rustup target add "$target" >&2
}
log "building guest binaries (musl, size-optimised)"
(cd "$root" && cargo build --quiet --target "$target" --profile guest -p guest-init -p guest-proxies) >&2
# Where cargo put them: $CARGO_TARGET_DIR (relative to the work tree) or target/.
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
out_bin="$target_dir/$target/guest"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,usr/libexec/sandbox,etc/ssl/certs,usr/local/share/ca-certificates,proc,sys,dev,run,tmp,root,home,var/tmp,mnt}
chmod 1777 "$stage/tmp" "$stage/var/tmp"
chmod 0700 "$stage/root"
install -m 0755 /bin/busybox "$stage/bin/busybox"
/bin/busybox --list-full | while IFS= read -r applet; do
    [ "$applet" = "bin/busybox" ] && continue
    [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
done
install -m 0755 "$out_bin/sandbox-init" "$stage/sbin/sandbox-init"
install -m 0755 "$out_bin/sandbox-proxy" "$stage/usr/libexec/sandbox/"
# A small HTTPS client (busybox's wget is not usable in the guest), and a
# tool that checks and measures vsock from inside.
install -m 0755 "$out_bin/fetch" "$out_bin/vsock-stream" "$stage/usr/bin/"
# The isolation probe (`sandbox verify-isolation` runs it in a canary sandbox).
install -m 0755 "$out_bin/sandbox-probe" "$stage/usr/bin/sandbox-probe"
# A second, independent TLS stack for programs and checks that want one:
# Debian's OpenSSL command line tool with the shared libraries it links
# (glibc's loader included). Its default trust store, /usr/lib/ssl/cert.pem,
# is the system bundle that init adds the sandbox CA to.
copy_with_libs() { # file in the host's root
    install -D -m 0755 "$1" "$stage$1"
    ldd "$1" | grep -o '/[^ ]*' | while IFS= read -r lib; do
        [ -e "$stage$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$stage$lib"
    done
}
need_pkg openssl /usr/bin/openssl
copy_with_libs /usr/bin/openssl
mkdir -p "$stage/usr/lib/ssl"
ln -s /etc/ssl/certs/ca-certificates.crt "$stage/usr/lib/ssl/cert.pem"
ln -s /etc/ssl/certs "$stage/usr/lib/ssl/certs"
# The console must exist before init mounts devtmpfs: the kernel opens it for init.
mknod -m 0600 "$stage/dev/console" c 5 1
mknod -m 0666 "$stage/dev/null" c 1 3
cat > "$stage/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$stage/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
printf '127.0.0.1 localhost\n' > "$stage/etc/hosts"
printf 'nameserver 10.0.0.1\n' > "$stage/etc/resolv.conf"
: > "$stage/etc/ssl/certs/ca-certificates.crt"

key="$( (cd "$stage" && find . -print0 | LC_ALL=C sort -z | xargs -0 -I{} sh -c 'printf "%s\n" "{}"; [ -L "{}" ] && readlink "{}"; [ -f "{}" ] && [ ! -L "{}" ] && sha256sum < "{}"; stat -c "%a %u %g %t %T" "{}"' ; cat "$root/rootfs/build-default.sh") | sha256sum | cut -c1-16)"
img="$cache/images/default-$key.erofs"
mkdir -p "$cache/images"
if [ -f "$img" ]; then
    log "cached: $img"
else
    log "writing $img"
    mkfs.erofs --quiet --all-root -T0 "$img.tmp" "$stage" >&2
    mv "$img.tmp" "$img"
fi
ln -sfn "default-$key.erofs" "$cache/images/default.erofs"
log "default image: $img ($(du -h "$img" | cut -f1))"
echo "$img"
