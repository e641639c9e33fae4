#!/usr/bin/env bash
# Reads stderr carrying abort_backtrace.c's frames ("object(+0xoffset) [address]") on stdin and
# prints each frame with its function (addr2line -f -C on the object; debug info not needed, the
# symbol table suffices). Other lines pass through. Used by scripts/gpu.sh, phase diag.
set -uo pipefail
re='^(/[^(]+)\(\+(0x[0-9a-f]+)\)'
while IFS= read -r line; do
  if [[ "${line}" =~ ${re} ]]; then
    fn=$(addr2line -f -C -e "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" 2>/dev/null | head -1)
    echo "${line}  ${fn:-?}"
  else
    echo "${line}"
  fi
done
