#!/usr/bin/env bash
# CIFAR-100 (or any file) sent to the device machine in parts, each small enough for one call's 64 MiB.
#
#   launch/cifar_parts.sh split [--archive FILE] [--dir DIR] [--max_mib N]   # here
#   launch/cifar_parts.sh status [--dir DIR]                                  # there, after each call
#   launch/cifar_parts.sh join [--dir DIR] [--to DIR]                          # there, once all have come
#
# split: cuts --archive (default ../shared/data/cifar-100-python.tar.gz, checked first against the
#   SHA256SUMS beside it when that lists it) into the fewest equal parts of at most --max_mib MiB
#   (default 48: a part, the working tree and the wheels stay under one call's 64 MiB) in --dir
#   (default .cifar_parts), with DIR/MANIFEST.sha256: one line per part and one for the whole file.
#   A --dir inside this repository is added to .git/info/exclude first (it never reaches a commit, and
#   only the paths a call names in `carry` travel), and split refuses to write if git still sees it.
#   It prints the `carry` list of each call.
# status: which parts are here, checked against the manifest (a damaged one is named); exit 0.
# join: refuses, naming them, when parts are missing or damaged (exit 1: on the device machine that
#   means it went back and a fresh one started bare, or a call did not carry them); else writes
#   --to/NAME (default /tmp/ijepa_data) and checks its SHA-256 against the manifest's before moving it
#   into place; an assembled file already there with that SHA-256 is kept (exit 0).
set -uo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 ]] || usage
CMD="$1"; shift
ARCHIVE="../shared/data/cifar-100-python.tar.gz" DIR=".cifar_parts" MAX_MIB=48 TO="/tmp/ijepa_data"
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || { echo "$1 needs a value" >&2; exit 2; }
  case "$1" in
    --archive) ARCHIVE="$2" ;;
    --dir) DIR="$2" ;;
    --max_mib) MAX_MIB="$2" ;;
    --to) TO="$2" ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift 2
done
MANIFEST="$DIR/MANIFEST.sha256"
PART_RE='\.part-[0-9]+-of-[0-9]+$'

parts() { awk '{print $2}' "$MANIFEST" | grep -E "$PART_RE"; }  # in order
whole() { awk '{print $2}' "$MANIFEST" | grep -Ev "$PART_RE"; }
sha_of() { awk -v f="$1" '$2 == f {print $1}' "$MANIFEST"; }
need_manifest() {
  [[ -f "$MANIFEST" ]] && return 0
  echo "no $MANIFEST here: none of the parts has arrived (a fresh device machine starts bare; every call" \
       "carries $MANIFEST with its part)." >&2
  exit 1
}

# Which parts are here and intact: sets MISSING and DAMAGED (part numbers) and LINE (a sentence).
check_parts() {
  MISSING=""; DAMAGED=""
  local have="" n=0 p k
  for p in $(parts); do
    n=$((n + 1)); k=${p##*.part-}; k=${k%%-of-*}
    if [[ ! -f "$DIR/$p" ]]; then MISSING+=" $k"
    elif [[ "$(sha256sum < "$DIR/$p" | cut -d' ' -f1)" != "$(sha_of "$p")" ]]; then DAMAGED+=" $k"
    else have+=" $k"; fi
  done
  LINE="$(whole): parts here:${have:- none} of $n${MISSING:+; missing:$MISSING}${DAMAGED:+; damaged:$DAMAGED}"
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
    rm -f "$DIR/$name".part-* "$MANIFEST"
    split -b "$chunk" -d -a 3 "$ARCHIVE" "$DIR/$name.split." || exit 1
    k=0
    for f in "$DIR/$name".split.*; do
      k=$((k + 1)); mv "$f" "$DIR/$name.part-$k-of-$n"
    done
    [[ $k -eq $n ]] || { echo "split made $k parts, expected $n" >&2; exit 1; }
    (cd "$DIR" && for k in $(seq 1 "$n"); do sha256sum "$name.part-$k-of-$n"; done) > "$MANIFEST.tmp"
    (cd "$(dirname "$ARCHIVE")" && sha256sum "$name") >> "$MANIFEST.tmp" && mv "$MANIFEST.tmp" "$MANIFEST"
    echo "$name: $size bytes in $n parts of at most $chunk bytes ($(( (chunk + 1048575) / 1048576 )) MiB) in $DIR"
    tree=0
    if [[ -z "${top:-}" || "$rel" == ..* ]]; then
      echo "note: $DIR is outside a git checkout; a device call carries only paths inside the repository" >&2
    else  # what every call sends anyway: tracked and untracked-not-ignored files
      tree=$( (cd "$top" && git ls-files -z -c -o --exclude-standard | du -cb --files0-from=- 2>/dev/null) \
              | tail -n 1 | cut -f1)
    fi
    echo "the working tree sends $(( (tree + 1048575) / 1048576 )) MiB with every call; one call each:"
    for k in $(seq 1 "$n"); do
      echo "  call $k: carry [\"$MANIFEST\", \"$DIR/$name.part-$k-of-$n\"]$( [[ $k -eq $n ]] && echo ' + your wheels folder')"
    done
    if (( tree + chunk > 60 * 1024 * 1024 )); then
      echo "warning: tree + one part is over 60 MiB: lower --max_mib" >&2
    fi
    ;;
  status)
    need_manifest
    check_parts
    echo "$LINE"
    ;;
  join)
    need_manifest
    name=$(whole)
    target="$TO/$name"
    if [[ -f "$target" && "$(sha256sum < "$target" | cut -d' ' -f1)" == "$(sha_of "$name")" ]]; then
      echo "$target is there already and matches the manifest"; exit 0
    fi
    check_parts
    if [[ -n "$MISSING$DAMAGED" ]]; then
      echo "refusing to join $LINE." >&2
      if [[ -n "$MISSING" ]]; then
        echo "  Missing parts never arrived or were lost: on the device machine, a call found a fresh (cold)" \
          "machine, which starts bare, or a call did not carry them. Send each again, then join:" >&2
        for p in $(parts); do
          [[ -f "$DIR/$p" ]] || echo "    carry [\"$MANIFEST\", \"$DIR/$p\"]" >&2
        done
      fi
      [[ -n "$DAMAGED" ]] && echo "  Damaged parts do not match the manifest: send them again." >&2
      exit 1
    fi
    mkdir -p "$TO" || exit 1
    for p in $(parts); do cat "$DIR/$p"; done > "$target.partial" || { rm -f "$target.partial"; exit 1; }
    got=$(sha256sum < "$target.partial" | cut -d' ' -f1)
    if [[ "$got" != "$(sha_of "$name")" ]]; then
      rm -f "$target.partial"
      echo "the joined file has SHA-256 $got, the manifest says $(sha_of "$name"): nothing was kept" >&2; exit 1
    fi
    mv "$target.partial" "$target"
    echo "$target: joined from $(parts | wc -l) parts, SHA-256 $got matches the manifest"
    ;;
  *) usage ;;
esac
