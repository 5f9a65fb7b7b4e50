#!/usr/bin/env bash
# CIFAR-100 (or any file) sent to the device machine in parts, each small enough for one call's 64 MiB.
#
#   launch/cifar_parts.sh split [--archive FILE] [--dir DIR] [--max_mib N]          # here, once
#   launch/cifar_parts.sh status [--dir DIR] [--store DIR]                           # there, every call
#   launch/cifar_parts.sh join [--dir DIR] [--store DIR] [--to DIR]                  # there, last call
#
# split: cuts --archive (default ../shared/data/cifar-100-python.tar.gz, checked first against the
#   SHA256SUMS beside it when that lists it) into the fewest equal parts of at most --max_mib MiB
#   (default 48: a part, the working tree and the wheels stay under one call's 64 MiB) in --dir
#   (default .cifar_parts), with DIR/MANIFEST.sha256: one line per part and one for the whole file.
#   A --dir inside this repository is added to .git/info/exclude first (it never reaches a commit, and
#   only the paths a call names in `carry` travel), and split refuses to write if git still sees it.
#   It prints the `carry` list of each call.
# status: copies the manifest and the intact parts that arrived in --dir into --store (default
#   /tmp/ijepa_parts, outside the checkout, so no later copy of the tree can touch them) and says
#   which parts the store holds; a part that arrived damaged is named and left out. Exit 0.
# join: status, then refuses, naming them, when parts are missing (exit 1: on the device machine that
#   means a call found a fresh machine, which starts bare, or did not carry them); else writes
#   --to/NAME (default /tmp/ijepa_data) and checks its SHA-256 against the manifest's before moving it
#   into place; an assembled file already there with that SHA-256 is kept (exit 0).
set -uo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 ]] || usage
CMD="$1"; shift
ARCHIVE="../shared/data/cifar-100-python.tar.gz" DIR=".cifar_parts" MAX_MIB=48 STORE="/tmp/ijepa_parts"
TO="/tmp/ijepa_data"
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || { echo "$1 needs a value" >&2; exit 2; }
  case "$1" in
    --archive) ARCHIVE="$2" ;;
    --dir) DIR="$2" ;;
    --max_mib) MAX_MIB="$2" ;;
    --store) STORE="$2" ;;
    --to) TO="$2" ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift 2
done
MANIFEST_NAME="MANIFEST.sha256"
PART_RE='\.part-[0-9]+-of-[0-9]+$'

parts() { awk '{print $2}' "$1/$MANIFEST_NAME" | grep -E "$PART_RE"; }  # in order
whole() { awk '{print $2}' "$1/$MANIFEST_NAME" | grep -Ev "$PART_RE"; }
sha_of() { awk -v f="$2" '$2 == f {print $1}' "$1/$MANIFEST_NAME"; }
sha() { sha256sum < "$1" | cut -d' ' -f1; }
number() { local k=${1##*.part-}; echo "${k%%-of-*}"; }

# Copies what arrived in DIR into STORE: the manifest (a different one empties the store first) and each
# intact part; sets DAMAGED (part numbers that arrived broken).
collect() {
  DAMAGED=""
  mkdir -p "$STORE" || exit 1
  if [[ -f "$DIR/$MANIFEST_NAME" ]]; then
    if [[ -f "$STORE/$MANIFEST_NAME" ]] && ! cmp -s "$DIR/$MANIFEST_NAME" "$STORE/$MANIFEST_NAME"; then
      echo "another manifest arrived: emptying $STORE"
      rm -f "$STORE"/*
    fi
    cp "$DIR/$MANIFEST_NAME" "$STORE/$MANIFEST_NAME" || exit 1
    local p
    for p in $(parts "$STORE"); do
      [[ -f "$DIR/$p" ]] || continue
      if [[ "$(sha "$DIR/$p")" == "$(sha_of "$STORE" "$p")" ]]; then
        cmp -s "$DIR/$p" "$STORE/$p" || cp "$DIR/$p" "$STORE/$p" || exit 1
      else
        DAMAGED+=" $(number "$p")"
      fi
    done
  fi
  if [[ ! -f "$STORE/$MANIFEST_NAME" ]]; then
    echo "no $MANIFEST_NAME in $DIR or $STORE: none of the parts has arrived (a fresh device machine starts" \
         "bare; every call carries $DIR/$MANIFEST_NAME with its part)." >&2
    exit 1
  fi
}

# Which parts the store holds: sets MISSING (part numbers) and LINE (a sentence).
check_store() {
  MISSING=""
  local have="" n=0 p
  for p in $(parts "$STORE"); do
    n=$((n + 1))
    if [[ -f "$STORE/$p" ]]; then have+=" $(number "$p")"; else MISSING+=" $(number "$p")"; fi
  done
  LINE="$(whole "$STORE"): parts here:${have:- none} of $n${MISSING:+; missing:$MISSING}"
  LINE+="${DAMAGED:+; arrived damaged (not kept):$DAMAGED}"
}

case "$CMD" in
  split)
    [[ -f "$ARCHIVE" ]] || { echo "no file $ARCHIVE" >&2; exit 1; }
    [[ "$MAX_MIB" =~ ^[0-9]+$ && "$MAX_MIB" -ge 1 ]] || { echo "--max_mib takes a whole number >= 1" >&2; exit 2; }
    name=$(basename "$ARCHIVE")
    sums="$(dirname "$ARCHIVE")/SHA256SUMS"
    if [[ -f "$sums" ]] && grep -q " \*\?$name\$" "$sums"; then
      (cd "$(dirname "$ARCHIVE")" && grep " \*\?$name\$" SHA256SUMS | sha256sum -c --quiet) \
        || { echo "$ARCHIVE does not match $sums: not splitting a damaged file" >&2; exit 1; }
    fi
    mkdir -p "$DIR" || exit 1
    rel=".."
    if top=$(git rev-parse --show-toplevel 2>/dev/null); then
      rel=$(realpath -m --relative-to="$top" "$DIR")
      if [[ "$rel" != ..* ]] && ! git check-ignore -q "$DIR/probe"; then
        exclude=$(git rev-parse --git-path info/exclude)
        mkdir -p "$(dirname "$exclude")" && echo "/$rel/" >> "$exclude"
        echo "added /$rel/ to $exclude"
      fi
      if [[ "$rel" != ..* ]] && ! git check-ignore -q "$DIR/probe"; then
        echo "$DIR is inside the repository and git does not ignore it: not writing parts there" >&2; exit 1
      fi
    fi
    size=$(stat -c %s "$ARCHIVE")
    max=$((MAX_MIB * 1024 * 1024))
    n=$(( (size + max - 1) / max )); (( n >= 1 )) || n=1
    chunk=$(( (size + n - 1) / n ))
    rm -f "$DIR/$name".part-* "$DIR/$name".split.* "$DIR/$MANIFEST_NAME"
    split -b "$chunk" -d -a 3 "$ARCHIVE" "$DIR/$name.split." || exit 1
    k=0
    for f in "$DIR/$name".split.*; do
      k=$((k + 1)); mv "$f" "$DIR/$name.part-$k-of-$n"
    done
    [[ $k -eq $n ]] || { echo "split made $k parts, expected $n" >&2; exit 1; }
    (cd "$DIR" && for k in $(seq 1 "$n"); do sha256sum "$name.part-$k-of-$n"; done) > "$DIR/$MANIFEST_NAME.tmp"
    (cd "$(dirname "$ARCHIVE")" && sha256sum "$name") >> "$DIR/$MANIFEST_NAME.tmp" \
      && mv "$DIR/$MANIFEST_NAME.tmp" "$DIR/$MANIFEST_NAME" || exit 1
    echo "$name: $size bytes in $n parts of at most $chunk bytes ($(( (chunk + 1048575) / 1048576 )) MiB) in $DIR"
    if [[ "$rel" == ..* ]]; then
      echo "note: $DIR is outside this git checkout; a device call carries only paths inside the repository" >&2
    else  # what every call sends anyway: tracked and untracked-not-ignored files
      tree=$( (cd "$top" && git ls-files -z -c -o --exclude-standard | du -cb --files0-from=- 2>/dev/null) \
              | tail -n 1 | cut -f1)
      echo "the working tree sends $(( (tree + 1048575) / 1048576 )) MiB with every call; one call per part:"
      for k in $(seq 1 "$n"); do
        echo "  call $k: carry [\"$rel/$MANIFEST_NAME\", \"$rel/$name.part-$k-of-$n\"]"
      done
      (( tree + chunk <= 58 * 1024 * 1024 )) || echo "warning: tree + one part is over 58 MiB: lower --max_mib" >&2
    fi
    ;;
  status)
    collect
    check_store
    echo "$LINE"
    ;;
  join)
    collect
    name=$(whole "$STORE")
    target="$TO/$name"
    if [[ -f "$target" && "$(sha "$target")" == "$(sha_of "$STORE" "$name")" ]]; then
      echo "$target is there already and matches the manifest"; exit 0
    fi
    check_store
    if [[ -n "$MISSING" ]]; then
      echo "refusing to join $LINE." >&2
      echo "  The missing parts never arrived or were lost: a call found a fresh (cold) device machine, which" \
        "starts bare, or did not carry them. Send each one again, then join:" >&2
      for p in $(parts "$STORE"); do
        [[ -f "$STORE/$p" ]] || echo "    carry [\"$DIR/$MANIFEST_NAME\", \"$DIR/$p\"]" >&2
      done
      exit 1
    fi
    mkdir -p "$TO" || exit 1
    for p in $(parts "$STORE"); do cat "$STORE/$p"; done > "$target.partial" || { rm -f "$target.partial"; exit 1; }
    got=$(sha "$target.partial")
    if [[ "$got" != "$(sha_of "$STORE" "$name")" ]]; then
      rm -f "$target.partial"
      echo "the joined file has SHA-256 $got, the manifest says $(sha_of "$STORE" "$name"): nothing was kept" >&2
      exit 1
    fi
    mv "$target.partial" "$target" || exit 1
    echo "$target: joined from $(parts "$STORE" | wc -l) parts, SHA-256 $got matches the manifest"
    ;;
  *) usage ;;
esac
