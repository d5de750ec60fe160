#!/usr/bin/env bash
# Puts libtcmalloc_minimal.so.4 in DIR (make install: .venv/lib/openft-malloc),
# the allocator openft's training processes run under (src/openft/heap.py).
# Debian's libtcmalloc-minimal4, unpacked, so no root is needed. Optional: where
# the system has the library already this does nothing, and where there is no
# apt it says so and training runs on the system's malloc. Never fails.
set -u
dest=$(realpath -m "${1:?usage: install-tcmalloc.sh DIR}")  # absolute: the work happens in a temp dir
lib=libtcmalloc_minimal.so.4
[ -f "$dest/$lib" ] && exit 0
for d in "/usr/lib/$(uname -m)-linux-gnu" /usr/lib64 /usr/lib /usr/local/lib; do
  if [ -f "$d/$lib" ]; then echo "tcmalloc: the system's $d/$lib"; exit 0; fi
done
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "tcmalloc: no apt-get here; training uses the system's malloc (install gperftools' tcmalloc for less memory)"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp" || exit 0
if ! apt-get download libtcmalloc-minimal4 >/dev/null 2>&1; then
  # A fresh container may have no package lists yet; root can fetch them.
  if [ "$(id -u)" != 0 ] || ! apt-get update -qq >/dev/null 2>&1 \
      || ! apt-get download libtcmalloc-minimal4 >/dev/null 2>&1; then
    echo "tcmalloc: could not fetch Debian's libtcmalloc-minimal4; training uses the system's malloc"
    exit 0
  fi
fi
if dpkg-deb -x libtcmalloc-minimal4_*.deb x && mkdir -p "$dest" && cp -L x/usr/lib/*/$lib "$dest/$lib.tmp"; then
  mv "$dest/$lib.tmp" "$dest/$lib"  # whole or absent: openft.heap preloads whatever file is there
  echo "tcmalloc: $dest/$lib"
else
  echo "tcmalloc: could not unpack libtcmalloc-minimal4; training uses the system's malloc"
fi
exit 0
