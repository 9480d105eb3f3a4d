#!/usr/bin/env bash
# Copy a campaign's reports (no checkpoints, no sample dumps) into results/NAME, with the command beside them.
# usage: scripts/export_run.sh RUN_DIR NAME "COMMAND THAT MADE IT"
set -euo pipefail
run=$1; name=$2; cmd=$3
dest=results/$name
rm -rf "$dest"; mkdir -p "$dest"
cp "$run"/config.yaml "$run"/manifest.json "$run"/report.json "$run"/report.md "$run"/report.html "$dest"/
cp -r "$run"/plots "$dest"/
[ -d "$run/rm/eval" ] && mkdir -p "$dest/rm_eval" && cp "$run"/rm/eval/* "$dest/rm_eval/"
# The initial RMs' evaluation names the folder they were trained in; a run directory renamed since (an ablation
# that became the default, or the reverse) would name its old place: point it at runs/NAME.
named=("$dest"/report.json); [ -f "$dest/rm_eval/rm_eval.json" ] && named+=("$dest"/rm_eval/rm_eval.json)
sed -i -E "s#runs/[A-Za-z0-9+_.-]+/rm/(helpful|safety)#runs/$name/rm/\1#g" "${named[@]}"
for d in "$run"/v*/; do k=$(basename "$d"); mkdir -p "$dest/$k"; cp "$d"report.json "$dest/$k/"; done
printf '# %s\n\nMade by:\n\n```bash\n%s\n```\n\nthen `scripts/export_run.sh %s %s "..."` (reports only; checkpoints and samples stay in the run directory).\nRead `report.md` (or open `report.html`).\n' "$name" "$cmd" "$run" "$name" > "$dest/README.md"
