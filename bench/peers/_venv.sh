# Sourced by the peer installers: a venv of its own that sees the project venv's packages
# after its own (a .pth file), so a peer reuses torch and numpy while its own pins shadow
# the project's. `venv_over_project DIR [--repo]`: --repo also puts the repository root on
# its path (to run `python -m lmexpand` with the peer importable).
venv_over_project() {
  local dir=$1 repo=${2:-}
  [ -x .venv/bin/python ] || { echo "run make setup first (.venv is reused)" >&2; return 1; }
  rm -rf "$dir"
  python3 -m venv "$dir"
  local site own
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  own=$("$dir/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  { [ "$repo" = "--repo" ] && pwd; (cd "$site" && pwd); } > "$own/lmexpand-venv.pth"
}
