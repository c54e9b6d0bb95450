"""The host's half of code snapshots, as POSIX ``sh`` text built here (pure: no I/O).

A per-user cache, ``${XDG_CACHE_HOME:-$HOME/.cache}/fleetctl`` (mode 0700, everything made under umask 077):

    blobs/<key>          contents, read-only, named by sha256 (``.x``: the executable variant)
    trees/<manifest>.tgz a tree's archive: hard links to ``.blobs/<key>``, and the keys it needs (code.want)
    uses/<manifest>      a tree's keys, one a line; its time says when it was last used (pruning reads it)
    ready/<manifest>     every blob of the tree was there when this was written (removed by each prune)
    incoming.XXXXXXXX/   an upload being unpacked; its blobs move into blobs/ once whole and verified
    readonly             a file of mode 0400: whoever can write to it (root) is not stopped by read-only files
    pruned.<epoch>       when the cache was last pruned

At dispatch (``check``, then ``upload`` when blobs were missing) the controller only makes sure the
cache holds the tree and its blobs: an unchanged tree costs one command that finds ``ready/<manifest>``.
Otherwise the command asks for the tree archive (exit :data:`NEED_TREE`; it arrives as ``code.tgz``
in the job directory and moves into the cache) or lists the keys the cache lacks (exit
:data:`MISSING`), which arrive as ``code.up.NNNNNN.tar`` archives.

The job's own tree, ``code/`` in its job directory, is built by the job's wrapper on the host before
the command starts (``build``), so a dispatch never waits for thousands of links to be made and the
controller goes on to the next job: ``.blobs`` in the job directory points at the cache (a symlink:
the tree's files become hard links into it, read-only, so a job that edits one in place is refused
rather than changing the cache and other jobs' trees) or is a directory of copies (reflinks where the
filesystem has them): when the cache is on another filesystem, when a hard link fails, and, unless
``code_tree = "link"``, for a user read-only modes do not stop (root). Files with the same content
share storage within one tree.

Every value reaches the script as a quoted positional argument, never pasted into its text. Pruning
(a tree's blobs stay while a ``uses/`` file younger than the age bound names them; past the size
bound the least recently used trees' blobs go first) runs in the ``check`` command at most once per
interval. A tree already built keeps its files (hard links or copies), so pruning never breaks a
running job; a job whose blobs were pruned between its dispatch and its start (another agent on the
same host pruning under size pressure, or someone emptying the cache by hand) fails saying so, and
its tree is checked blob by blob at its next dispatch.
"""

from __future__ import annotations

import shlex
import time

MISSING = 10  # exit code: the listed keys are not in the cache
NEED_TREE = 11  # exit code: send the tree archive

SCRIPT = r"""umask 077
d=$1 m=$2 step=$3 now=$4 prune_before=$5 age_cut=$6 max_bytes=$7 tree=$8
c="${XDG_CACHE_HOME:-$HOME/.cache}/fleetctl"; b="$c/blobs"; t="$c/trees/$m.tgz"
fail() { rc=$1; shift; printf 'fleetctl: %s\n' "$*" >&2; exit "$rc"; }
if [ ! -f "$c/readonly" ] || [ ! -d "$c/ready" ]; then
  mkdir -p "$b" "$c/uses" "$c/trees" "$c/ready" && chmod 700 "$c" "$b" "$c/uses" "$c/trees" "$c/ready" &&
    : > "$c/readonly" && chmod 400 "$c/readonly" || fail 22 "cannot make the code cache $c"
fi
cd "$d" || fail 23 "the job directory $d is missing"
ingest() {
  set -- code.up.*.tar
  [ -f "$1" ] || return 0
  in=$(mktemp -d "$c/incoming.XXXXXXXX") || return 1
  for u in code.up.*.tar; do tar -xmof "$u" -C "$in" || return 1; rm -f "$u"; done
  for p in "$in"/*.part.000001; do
    [ -f "$p" ] || continue
    k=${p%.part.000001}
    cat "$k".part.* > "$k.join" && rm -f "$k".part.* && mv "$k.join" "$k" || return 1
    case $k in *.x) chmod 500 "$k" ;; *) chmod 400 "$k" ;; esac
  done
  [ -n "$(ls "$in")" ] || { rm -rf "$in"; return 0; }
  if command -v sha256sum >/dev/null 2>&1; then
    bad=$(cd "$in" && ls | xargs sha256sum -- | awk '{ n = $2; sub(/^\*/, "", n); h = n; sub(/\..*/, "", h); if ($1 != h) print n }')
    [ -z "$bad" ] || { rm -rf "$in"; printf 'fleetctl: uploaded blobs arrived damaged: %s\n' "$bad" >&2; return 1; }
  fi
  (cd "$in" && ls | xargs sh -c 'mv -f -- "$@" "$0"' "$b") || return 1
  rm -rf "$in"
}
missing() {
  : > code.have
  if [ -s code.want ]; then (cd "$b" && xargs ls -d -- < "$d/code.want" > "$d/code.have" 2>/dev/null); fi
  grep -vxF -f code.have code.want
}
verify() {
  lacking=$(missing)
  if [ -n "$lacking" ]; then printf '%s\n' "$lacking"; exit 10; fi
  : > "$c/ready/$m"
  rm -f code.want code.have code.err
}
clean() {
  if [ -e code ] || [ -e .blobs ] || [ -L .blobs ]; then rm -rf code .blobs; fi
}
build_linked() {
  [ "$tree" = copy ] && return 1
  [ "$tree" = auto ] && [ -w "$c/readonly" ] && return 1
  clean
  ln -s "$b" .blobs || return 1
  tar -xzmof "$t" 2>code.err
}
build_copied() {
  clean
  mkdir .blobs || return 1
  tar -xzOf "$t" code.want > code.want 2>code.err || return 1
  CPFLAGS=; cp --reflink=auto code.want .probe 2>/dev/null && CPFLAGS=--reflink=auto; rm -f .probe; export CPFLAGS
  if [ -s code.want ]; then
    (cd "$b" && xargs sh -c 'dest=$1; shift; exec cp $CPFLAGS -- "$@" "$dest"' sh "$d/.blobs" < "$d/code.want") 2>code.err || return 1
  fi
  tar -xzmof "$t" 2>code.err
}
prune() {
  TZ=UTC0 touch -t "$age_cut" "$c/cutoff" || return 0
  find "$c/uses" -type f ! -newer "$c/cutoff" -exec rm -f -- {} +
  for x in "$c"/incoming.*; do
    [ -d "$x" ] && [ -z "$(find "$x" -prune -newer "$c/cutoff")" ] && rm -rf -- "$x"
  done
  for x in "$c"/trees/*.tgz; do
    n=${x##*/}; [ -f "$x" ] && [ ! -f "$c/uses/${n%.tgz}" ] && [ -z "$(find "$x" -newer "$c/cutoff")" ] && rm -f -- "$x"
  done
  (cd "$c/uses" && ls -t | xargs cat -- 2>/dev/null) > "$c/order"
  (cd "$b" && ls -ln) | awk '$1 ~ /^-/ { print $5, $NF }' > "$c/sizes"
  awk -v max="$max_bytes" 'FNR == NR { size[$2] = $1; next }
    ($1 in size) && !($1 in keep) && total + size[$1] <= max { keep[$1] = 1; total += size[$1] }
    END { for (k in size) if (!(k in keep)) print k }' "$c/sizes" "$c/order" > "$c/doomed"
  [ -s "$c/doomed" ] && (cd "$b" && xargs rm -f -- < "$c/doomed")
  rm -f "$c/order" "$c/sizes" "$c/doomed" "$c"/pruned.* "$c"/ready/*
  : > "$c/pruned.$now"
}
case $step in
build)
  [ -f "$t" ] || { rm -f "$c/ready/$m"; fail 26 "the job's code tree is gone from the cache $c (pruned since its dispatch?)"; }
  if ! build_linked; then
    build_copied || { clean; rm -f "$c/ready/$m"; fail 26 "cannot build the job's code tree in $d: $(head -c 300 code.err)"; }
  fi
  rm -rf .blobs code.want code.err
  exit 0 ;;
upload)
  ingest || fail 25 "cannot unpack the uploaded code into $c"
  verify ;;
*)
  if [ -f code.tgz ]; then
    mv -f code.tgz "$t.$$" && mv -f "$t.$$" "$t" || fail 22 "cannot write to the code cache $c"
  fi
  [ -f "$t" ] || exit 11
  if [ -f "$c/ready/$m" ]; then touch -c "$c/uses/$m"
  else
    tar -xzOf "$t" code.want > code.want 2>code.err || fail 24 "cannot read $t: $(head -c 300 code.err)"
    cp code.want "$c/uses/$m.$$" && mv -f "$c/uses/$m.$$" "$c/uses/$m" || fail 22 "cannot write to the code cache $c"
    verify
  fi ;;
esac
last=0
for x in "$c"/pruned.*; do [ -e "$x" ] && last=${x##*.}; done
case $last in *[!0-9]*|'') last=0 ;; esac
[ "$last" -lt "$prune_before" ] && prune
echo "code ready"
"""


def touch_time(epoch: float) -> str:
    """``touch -t`` wants local time; the script runs it with ``TZ=UTC0``, so this is UTC."""
    return time.strftime("%Y%m%d%H%M.%S", time.gmtime(max(epoch, 0)))


def code_command(remote_dir: str, manifest: str, step: str, *, now: float = 0.0, prune_every_s: float = 0.0,
                 max_age_s: float = 0.0, max_bytes: int = 0, tree: str = "auto") -> str:
    """``step``: ``check`` (is the tree ready in the cache? else exit :data:`NEED_TREE` or :data:`MISSING`),
    ``upload`` (unpack the uploaded blobs, then check), or ``build`` (the job's tree, run by its
    wrapper). ``tree``: ``link``, ``copy`` or ``auto`` (links unless read-only files do not stop the user).
    The cache is pruned when it was last pruned more than ``prune_every_s`` ago, by the stamp
    ``pruned.<epoch>`` (read without starting a process: ``check`` is on every dispatch's path)."""
    prune_before = int(now - prune_every_s) if prune_every_s > 0 else int(now) + 1
    args = [remote_dir, manifest, step, str(int(now)), str(prune_before), touch_time(now - max_age_s), str(max_bytes), tree]
    return "sh -c " + shlex.quote(SCRIPT) + " fleetctl-code " + " ".join(shlex.quote(a) for a in args)


def upload_name(remote_dir: str, number: int) -> str:
    return f"{remote_dir}/code.up.{number:06d}.tar"


def tree_name(remote_dir: str) -> str:
    return f"{remote_dir}/code.tgz"
