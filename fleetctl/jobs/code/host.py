"""The host's half of code snapshots, as POSIX ``sh`` text built here (pure: no I/O).

A per-user cache, ``${XDG_CACHE_HOME:-$HOME/.cache}/fleetctl`` (mode 0700, everything made under umask 077):

    blobs/<key>          contents, read-only, named by sha256 (``.x``: the executable variant)
    uses/<manifest>      the keys of a tree built here, one a line; its time says when it was last used
    incoming.XXXXXXXX/   an upload being unpacked; its blobs move into blobs/ once whole and verified
    probe, pruned        a file to test hard links with; when the cache was last pruned

In the job directory, only while its tree is built: ``code.tar`` (the tree, from the controller),
``code.up.NNNNNN.tar`` (blobs the cache lacked), ``code.want``, and ``.blobs``, which points at the
cache (a symlink: the tree's files become hard links into it, read-only, so a job that edits one in
place is refused rather than changing the cache and other jobs' trees) or is a directory of copies
(reflinks where the filesystem has them): when the cache is on another filesystem, when a hard link
fails, and, unless ``code_tree = "link"``, for root, whom read-only modes do not stop. Files with the
same content share storage within one tree. The tree is ``code/``.

One script does every step, so an unchanged tree costs one command: it builds the tree at once and
only when a blob is missing answers with the missing keys (exit :data:`MISSING`) for the controller to
upload and run it again. Every value reaches the script as a quoted positional argument, never
pasted into its text. Pruning (a tree's blobs stay while any ``uses/`` file younger than the age bound
names them; past the size bound the least recently used trees' blobs go first) runs in the same
command at most once per interval; a tree already built keeps its files (hard links or copies), so
pruning never breaks a running job, and a dispatch whose blobs were pruned in between is retried.
"""

from __future__ import annotations

import shlex
import time

MISSING = 10  # exit code: the listed keys are not in the cache
NO_TAR = 21

SCRIPT = r"""umask 077
d=$1 m=$2 step=$3 prune_since=$4 age_cut=$5 max_bytes=$6 tree=$7
c="${XDG_CACHE_HOME:-$HOME/.cache}/fleetctl"; b="$c/blobs"
fail() { rc=$1; shift; printf '%s\n' "$*" >&2; exit "$rc"; }
command -v tar >/dev/null 2>&1 || fail 21 "tar not found on the host (install tar)"
mkdir -p "$b" "$c/uses" && chmod 700 "$c" "$b" "$c/uses" || fail 22 "cannot make the code cache $c"
cd "$d" || fail 23 "the job directory $d is missing"
ingest() {
  set -- code.up.*.tar
  [ -f "$1" ] || return 0
  in=$(mktemp -d "$c/incoming.XXXXXXXX") || return 1
  for t in code.up.*.tar; do tar -xmof "$t" -C "$in" || return 1; rm -f "$t"; done
  for p in "$in"/*.part.000001; do
    [ -f "$p" ] || continue
    k=${p%.part.000001}
    cat "$k".part.* > "$k.join" && rm -f "$k".part.* && mv "$k.join" "$k" || return 1
    case $k in *.x) chmod 500 "$k" ;; *) chmod 400 "$k" ;; esac
  done
  [ -n "$(ls "$in")" ] || { rm -rf "$in"; return 0; }
  if command -v sha256sum >/dev/null 2>&1; then
    bad=$(cd "$in" && ls | xargs sha256sum -- | awk '{ n = $2; sub(/^\*/, "", n); h = n; sub(/\..*/, "", h); if ($1 != h) print n }')
    [ -z "$bad" ] || { rm -rf "$in"; printf 'uploaded blobs arrived damaged: %s\n' "$bad" >&2; return 1; }
  fi
  (cd "$in" && ls | xargs sh -c 'mv -f -- "$@" "$0"' "$b") || return 1
  rm -rf "$in"
}
missing() {
  : > code.have
  if [ -s code.want ]; then (cd "$b" && xargs ls -d -- < "$d/code.want" > "$d/code.have" 2>/dev/null); fi
  grep -vxF -f code.have code.want
}
build_linked() {
  [ "$tree" = copy ] && return 1
  [ "$tree" = auto ] && [ "$(id -u)" = 0 ] && return 1
  ln "$c/probe" .probe 2>/dev/null || return 1
  rm -f .probe
  rm -rf code .blobs && ln -s "$b" .blobs || return 1
  tar -xof code.tar 2>code.err; rc=$?
  rm -f .blobs; return $rc
}
build_copied() {
  rm -rf code .blobs && mkdir .blobs || return 1
  CPFLAGS=; cp --reflink=auto "$c/probe" .probe 2>/dev/null && CPFLAGS=--reflink=auto; rm -f .probe; export CPFLAGS
  if [ -s code.want ]; then
    (cd "$b" && xargs sh -c 'dest=$1; shift; exec cp $CPFLAGS -- "$@" "$dest"' sh "$d/.blobs" < "$d/code.want") 2>code.err || return 1
  fi
  tar -xof code.tar 2>code.err; rc=$?
  rm -rf .blobs; return $rc
}
prune() {
  TZ=UTC0 touch -t "$age_cut" "$c/cutoff" || return 0
  find "$c/uses" -type f ! -newer "$c/cutoff" -exec rm -f -- {} +
  for x in "$c"/incoming.*; do
    [ -d "$x" ] && [ -z "$(find "$x" -prune -newer "$c/cutoff")" ] && rm -rf -- "$x"
  done
  (cd "$c/uses" && ls -t | xargs cat -- 2>/dev/null) > "$c/order"
  (cd "$b" && ls -ln) | awk '$1 ~ /^-/ { print $5, $NF }' > "$c/sizes"
  awk -v max="$max_bytes" 'FNR == NR { size[$2] = $1; next }
    ($1 in size) && !($1 in keep) && total + size[$1] <= max { keep[$1] = 1; total += size[$1] }
    END { for (k in size) if (!(k in keep)) print k }' "$c/sizes" "$c/order" > "$c/doomed"
  [ -s "$c/doomed" ] && (cd "$b" && xargs rm -f -- < "$c/doomed")
  rm -f "$c/order" "$c/sizes" "$c/doomed"
  : > "$c/pruned"
}
if [ "$step" = upload ]; then ingest || fail 25 "cannot unpack the uploaded code into $c"; fi
tar -xof code.tar code.want 2>code.err || fail 24 "cannot read $d/code.tar: $(head -c 300 code.err)"
cp code.want "$c/uses/$m.$$" && mv -f "$c/uses/$m.$$" "$c/uses/$m" || fail 22 "cannot write to the code cache $c"
[ -f "$c/probe" ] || : > "$c/probe"
how=linked
if ! build_linked; then
  lacking=$(missing)
  if [ -n "$lacking" ]; then rm -rf code; printf '%s\n' "$lacking"; exit 10; fi
  how=copied
  build_copied || { rm -rf code; fail 26 "cannot build the code tree in $d: $(head -c 300 code.err)"; }
fi
rm -f code.tar code.want code.have code.err
if [ ! -f "$c/pruned" ] || [ -z "$prune_since" ]; then prune
else
  TZ=UTC0 touch -t "$prune_since" "$c/since" && [ -z "$(find "$c/pruned" -newer "$c/since")" ] && prune
fi
echo "code $how"
"""


def touch_time(epoch: float) -> str:
    """``touch -t`` wants local time; the script runs it with ``TZ=UTC0``, so this is UTC."""
    return time.strftime("%Y%m%d%H%M.%S", time.gmtime(max(epoch, 0)))


def build_command(remote_dir: str, manifest: str, step: str, *, now: float, prune_every_s: float,
                  max_age_s: float, max_bytes: int, tree: str = "auto") -> str:
    """``step``: ``first`` (build, or list what is missing) or ``upload`` (unpack the uploads, then build).
    ``tree``: ``link``, ``copy`` or ``auto`` (links unless the user is root)."""
    prune_since = touch_time(now - prune_every_s) if prune_every_s > 0 else ""
    args = [remote_dir, manifest, step, prune_since, touch_time(now - max_age_s), str(max_bytes), tree]
    return "sh -c " + shlex.quote(SCRIPT) + " fleetctl-code " + " ".join(shlex.quote(a) for a in args)


def upload_name(remote_dir: str, number: int) -> str:
    return f"{remote_dir}/code.up.{number:06d}.tar"


def tree_name(remote_dir: str) -> str:
    return f"{remote_dir}/code.tar"
