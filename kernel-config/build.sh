#!/usr/bin/env bash
# Build the guest kernel (vmlinux, booted through its PVH entry) and cache it.
#
#   kernel-config/build.sh            build if needed, print the path of vmlinux
#   kernel-config/build.sh --print    print where vmlinux is (or would be), build nothing
#
# Source: Debian's linux-source-6.12 package. The result is cached outside the
# work tree, in $SANDBOX_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/sandbox),
# under kernel/<key>/ where <key> hashes the source version, sandbox.config,
# the patches and this script; kernel/vmlinux links to the newest build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${SANDBOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandbox}"
pkg=linux-source-6.12
log() { printf '[kernel] %s\n' "$*" >&2; }
die() { printf '[kernel] error: %s\n' "$*" >&2; exit 1; }

install_deps() {
    local missing=()
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    for tool in flex:flex bison:bison bc:bc gcc:gcc make:make; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
    done
    dpkg -s libelf-dev >/dev/null 2>&1 || missing+=(libelf-dev)
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "missing packages: ${missing[*]}; run: sudo apt-get install ${missing[*]}"
    log "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
}

source_version() { dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || echo unknown; }

key() {
    { source_version; cat "$here/sandbox.config" "$here"/patches/*.patch "$here/build.sh"; } \
        | sha256sum | cut -c1-16
}

if [ "${1:-}" = "--print" ]; then
    dpkg -s "$pkg" >/dev/null 2>&1 || { echo "$cache/kernel/vmlinux"; exit 0; }
    echo "$cache/kernel/$(key)/vmlinux"
    exit 0
fi

install_deps
k="$(key)"
out="$cache/kernel/$k"
if [ -f "$out/vmlinux" ]; then
    ln -sfn "$k/vmlinux" "$cache/kernel/vmlinux"
    log "cached: $out/vmlinux"
    echo "$out/vmlinux"
    exit 0
fi

src="$cache/kernel/build-$k"
rm -rf "$src"
mkdir -p "$src"
log "unpacking $pkg $(source_version) into $src"
tar -xf /usr/src/$pkg.tar.xz -C "$src" --strip-components=1
for p in "$here"/patches/*.patch; do
    log "patch $(basename "$p")"
    patch -d "$src" -p1 --quiet --forward < "$p" || die "patch $(basename "$p") does not apply to $pkg $(source_version)"
done

log "configuring: tinyconfig + sandbox.config"
make -C "$src" -s tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/sandbox.config" >/dev/null
make -C "$src" -s olddefconfig >/dev/null

# Every option of the fragment must survive olddefconfig: an option renamed or
# gated by a missing dependency would otherwise vanish without a word.
bad=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) want="$line" ;;
        "# CONFIG_"*" is not set") want="$line" ;;
        *) continue ;;
    esac
    opt="${want#\# }"; opt="${opt%%=*}"; opt="${opt%% *}"
    have="$(grep -E "^(# )?$opt[= ]" "$src/.config" || echo "# $opt is not set")"
    if [ "$have" != "$want" ]; then
        log "config mismatch: wanted '$want', got '$have'"
        bad=1
    fi
done < "$here/sandbox.config"
[ "$bad" -eq 0 ] || die "sandbox.config does not apply cleanly (see above)"

jobs="$(nproc)"
log "building vmlinux with $jobs jobs (about 10 minutes on 2 cores; log: $src/build.log)"
n=0
start=$SECONDS
set +e
make -C "$src" -j"$jobs" vmlinux 2>&1 | tee "$src/build.log" | while IFS= read -r l; do
    case "$l" in
        *" CC "*|*" AS "*|*" LD "*|*" AR "*)
            n=$((n + 1))
            if [ $((n % 200)) -eq 0 ]; then
                log "$n objects built, $((SECONDS - start)) s"
            fi ;;
    esac
done
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || { tail -30 "$src/build.log" >&2; die "kernel build failed; full log: $src/build.log"; }

mkdir -p "$out"
cp "$src/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$src/.config" "$out/config"
ln -sfn "$k/vmlinux" "$cache/kernel/vmlinux"
rm -rf "$src"
log "built in $((SECONDS - start)) s: $out/vmlinux"
echo "$out/vmlinux"
