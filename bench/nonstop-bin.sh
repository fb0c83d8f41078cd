# Sourced by the benchmark scripts: builds (when stale) the binary they measure, the `dist` profile that is
# shipped (whole-program optimisation), and names it NONSTOP. Set NONSTOP to measure another build instead.
if [ -z "${NONSTOP:-}" ]; then
  echo "building nonstop with the dist profile (slow the first time: whole-program optimisation)" >&2
  cargo build --profile dist -p nonstop -q
  NONSTOP=$PWD/target/dist/nonstop
fi
