# Sourced by scripts/setup.sh and scripts/sanitize.sh: apt_install_missing WHO PKG... installs the
# Debian packages that are not installed yet (apt-get update first, only when something is missing).
apt_install_missing() {
  local who=$1 missing=() p sudo_cmd=""
  shift
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  echo "$who: installing ${missing[*]}"
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
