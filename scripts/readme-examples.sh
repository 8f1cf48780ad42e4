#!/usr/bin/env bash
# scripts/readme-examples.sh — run the README's examples against a running
# `make dev`, as a newcomer would paste them into a shell.
#
# Runs every fenced ```sh block of README.md that follows a marker line
#   <!-- example: expect TEXT[; expect TEXT...][; timeout SECONDS] -->
# in a fresh bash (`set -e -o pipefail`) from the repository root, with the
# Herald/Postgres/Redis variables of this shell removed (a newcomer's shell
# has none; the blocks `source .dev/env` themselves). A block passes when it
# exits 0 (or is stopped by its timeout, for commands that run until Ctrl-C)
# and its output (stdout and stderr) contains every TEXT.
#
# Usage: make dev   (in one shell; wait for "ready"), then
#        scripts/readme-examples.sh [README.md]
# Not part of CI: it needs the servers `make dev` starts.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
README=${1:-README.md}

[[ -f .dev/env ]] || { echo "readme-examples: .dev/env not found; is make dev running?" >&2; exit 2; }

# Blocks as records: marker line number, marker, code (NUL-separated).
extract() {
    awk '
        /^<!-- example:.*-->$/ { marker = $0; line = NR; next }
        marker != "" && /^```sh$/ { inblock = 1; code = ""; next }
        inblock && /^```$/ { printf "%s\037%s\037%s\0", line, marker, code; inblock = 0; marker = ""; next }
        inblock { code = code $0 "\n"; next }
        marker != "" && !/^[[:space:]]*$/ { marker = "" }
    ' "$README"
}

clean_env=()
while IFS='=' read -r name _; do
    case $name in
    HERALD_* | DATABASE_URL | REDIS_URL | PGHOST | PGPORT | PGUSER | PGDATABASE) clean_env+=(-u "$name") ;;
    esac
done < <(env)

pass=0 fail=0
while IFS=$'\037' read -r -d '' line marker code; do
    spec=${marker#<!-- example:}
    spec=${spec%-->}
    expects=()
    limit=60
    IFS=';' read -ra parts <<<"$spec"
    for part in "${parts[@]}"; do
        part=${part#"${part%%[![:space:]]*}"}
        part=${part%"${part##*[![:space:]]}"}
        case $part in
        expect\ *) expects+=("${part#expect }") ;;
        timeout\ *) limit=${part#timeout } ;;
        "") ;;
        *) echo "readme-examples: $README:$line: unknown marker part '$part'" >&2; exit 2 ;;
        esac
    done
    out=$(env "${clean_env[@]}" timeout "$limit" bash -e -o pipefail -c "$code" 2>&1)
    rc=$?
    ok=1
    if ((rc != 0)) && ! [[ $marker == *timeout* && $rc == 124 ]]; then
        ok=0
        why="exit status $rc"
    fi
    for e in "${expects[@]}"; do
        if ((ok)) && [[ $out != *"$e"* ]]; then
            ok=0
            why="output lacks '$e'"
        fi
    done
    if ((ok)); then
        pass=$((pass + 1))
        echo "ok    $README:$line"
    else
        fail=$((fail + 1))
        echo "FAIL  $README:$line ($why)"
        printf '%s' "$code" | sed 's/^/      $ /'
        printf '%s\n' "$out" | tail -n 20 | sed 's/^/      | /'
    fi
done < <(extract)

echo "readme-examples: $pass passed, $fail failed"
((pass > 0 && fail == 0))
