# Sourced by the benchmark scripts: installs the peers they run beside nonstop from Debian's packages when missing.
# need COMMAND=PACKAGE...: installs each PACKAGE whose COMMAND is neither on PATH nor in /usr/sbin (where Debian
# puts nginx and haproxy), in one apt-get run.
need() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || [ -x "/usr/sbin/${pair%%=*}" ] || missing+=("${pair#*=}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} from Debian's packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}
