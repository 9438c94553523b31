#!/usr/bin/env bash
# The README's main-job command: set-up, the built-in toy-city data, training of the tiny early-exit HRNet (the demo
# config, widths 16/32/64/128; CONFIG=... selects another) with
# mmseg's tools/train.py (CBT calibration hook on), mmseg's tools/test.py with per-exit mIoU (dense and CBT), and the
# mIoU-versus-GFLOPs report (dense / ADP-C / CBT / CBT-ns) with its plot, and exit-map pictures of a few val images.
#   bash tools/run_demo.sh                 # everything, ~19 min on 2 CPU cores after set-up (15 of them training)
#   WORK_DIR=work_dirs/x MAX_ITERS=300 bash tools/run_demo.sh
#   FINETUNE=1 bash tools/run_demo.sh       # plus 300 iterations of fine-tuning with the stop masks on (~4 min)
#   VIT=1 bash tools/run_demo.sh            # the plain-ViT demo instead (DToP's host, see run_vit_demo below)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
demo_start=$(date +%s)
bash tools/setup_env.sh
PY=.venv/bin/python

# The plain-ViT demo: the tiny early-exit ViT (DToP's attention-to-mask head at every exit by default; VIT_CONFIG
# selects another, e.g. the per-token exits) trained from scratch on toy-city with the CBT calibration hook, tested
# with tools/test.py (dense, DToP's rule), and the mIoU-versus-GFLOPs report with dense / DToP (0.9, k=5) / ADP-C /
# CBT / CBT-ns, tokens removed for real after each exit. MAX_IMAGES limits the report to the first N test images,
# CALIB_BATCHES the calibration to the first N training images (a quick check only: CBT needs all of them).
run_vit_demo() {
  local config="${VIT_CONFIG:-configs/ee_vit/ee-vit-tiny-atm_1xb4-1k_toycity-256x512.py}"
  local work_dir="${WORK_DIR:-work_dirs/toycity_vit_demo}"
  local iters="${MAX_ITERS:-1000}"
  local warm=$(( iters > 100 ? 50 : iters / 2 ))  # the config's warm-up (50), shortened for very short runs
  local limit=() calib=()
  [[ -n "${MAX_IMAGES:-}" ]] && limit=(--max-images "$MAX_IMAGES")
  [[ -n "${CALIB_BATCHES:-}" ]] && calib=(custom_hooks.0.max_batches="$CALIB_BATCHES")
  echo "== 1/4 toy-city data (data/toy_city)"
  $PY tools/dataset_converters/toy_city.py --out data/toy_city
  echo "== 2/4 train the tiny ViT ($iters iterations, mmseg tools/train.py, CBT calibration at the end)"
  local start
  start=$(date +%s)
  $PY tools/train.py "$config" --work-dir "$work_dir" \
    --cfg-options train_cfg.max_iters="$iters" train_cfg.val_interval="$iters" \
    default_hooks.checkpoint.interval="$iters" param_scheduler.0.end="$warm" param_scheduler.1.begin="$warm" \
    param_scheduler.1.end="$iters" "${calib[@]}"
  echo "training wall time: $(( $(date +%s) - start )) s"
  local ckpt="$work_dir/iter_${iters}.pth"
  echo "== 3/4 test the saved checkpoint (mmseg tools/test.py): dense exits, then DToP's rule"
  $PY tools/test.py "$config" "$ckpt" --work-dir "$work_dir/test_dense"
  $PY tools/test.py "$config" "$ckpt" --work-dir "$work_dir/test_dtop" \
    --cfg-options model.test_cfg.exit_mode=dtop model.test_cfg.dtop_threshold=0.9 model.test_cfg.dtop_topk=5
  echo "== 4/4 mIoU versus GFLOPs per exit, stopped tokens removed from every later block"
  $PY tools/analysis_tools/miou_vs_gflops.py "$config" "$ckpt" --out-dir "$work_dir/report" \
    --feature-mask sparse "${limit[@]}" --settings dense dtop:0.9,5 adpc:0.9 cbt:0.9,0.998 cbtns:0.9,0.998
  echo
  echo "checkpoint (with CBT thresholds): $ckpt"
  echo "report: $work_dir/report/miou_vs_gflops.{txt,json,csv,png}"
  echo "demo wall time: $(( $(date +%s) - demo_start )) s"
}
if [[ "${VIT:-0}" == "1" ]]; then
  run_vit_demo
  exit 0
fi
CONFIG="${CONFIG:-configs/ee_hrnet/ee-fcn_hr-tiny-w16_1xb4-1k_toycity-256x512.py}"
WORK_DIR="${WORK_DIR:-work_dirs/toycity_demo}"
MAX_ITERS="${MAX_ITERS:-1000}"
# the toy config warms up linearly for 50 iterations, then decays to max_iters: fewer cannot be scheduled
if ! [[ "$MAX_ITERS" =~ ^[0-9]+$ ]] || (( MAX_ITERS <= 50 )); then
  echo "run_demo.sh: MAX_ITERS must be an integer above 50 (the warm-up of $CONFIG), got '$MAX_ITERS'" >&2
  exit 2
fi

echo "== 1/5 toy-city data (data/toy_city)"
$PY tools/dataset_converters/toy_city.py --out data/toy_city

echo "== 2/5 train ($MAX_ITERS iterations, mmseg tools/train.py)"
start=$(date +%s)
$PY tools/train.py "$CONFIG" --work-dir "$WORK_DIR" \
  --cfg-options train_cfg.max_iters="$MAX_ITERS" train_cfg.val_interval="$MAX_ITERS" \
  default_hooks.checkpoint.interval="$MAX_ITERS" param_scheduler.1.end="$MAX_ITERS"
echo "training wall time: $(( $(date +%s) - start )) s"
CKPT="$WORK_DIR/iter_${MAX_ITERS}.pth"

echo "== 3/5 test the saved checkpoint (mmseg tools/test.py): dense exits, then CBT stop masks"
$PY tools/test.py "$CONFIG" "$CKPT" --work-dir "$WORK_DIR/test_dense"
$PY tools/test.py "$CONFIG" "$CKPT" --work-dir "$WORK_DIR/test_cbt" --cfg-options model.test_cfg.exit_mode=cbt

echo "== 4/5 mIoU versus GFLOPs per exit"
# (a) the papers' convention: features stay dense, stopped pixels keep the logits of their exit (CBT is post hoc)
$PY tools/analysis_tools/miou_vs_gflops.py "$CONFIG" "$CKPT" --out-dir "$WORK_DIR/report" --feature-mask none \
  --settings dense adpc:0.998 adpc:0.95 cbt:0.9,0.998 cbtns:0.9,0.998
# (b) real skipping: stages and exits after an exit computed at the active pixels only (sparse convs), wall time
$PY tools/analysis_tools/miou_vs_gflops.py "$CONFIG" "$CKPT" --out-dir "$WORK_DIR/report_sparse" \
  --feature-mask sparse --settings dense adpc:0.998 adpc:0.95 cbt:0.9,0.998
echo "== 5/5 exit maps (where pixels stop): CBT, and CBT next to ADP-C at the same beta, on three val images"
mkdir -p "$WORK_DIR/exit_maps"
for IMG in $(ls data/toy_city/leftImg8bit/val/*/*_leftImg8bit.png | head -3); do
  NAME=$(basename "$IMG" _leftImg8bit.png)
  $PY tools/image_demo.py "$IMG" "$CONFIG" "$CKPT" --exit-mode cbt --out-file "$WORK_DIR/exit_maps/${NAME}_cbt.png"
  $PY tools/misc/exit_map_pair.py "$IMG" "$CONFIG" "$CKPT" --out-file "$WORK_DIR/exit_maps/${NAME}_cbt_vs_adpc.png"
done
if [[ "${FINETUNE:-0}" == "1" ]]; then
  echo "== extra: fine-tuning with the stop masks active (train_cfg.masked_training), then its report"
  # the settings of configs/ee_hrnet/ee-fcn_hr-tiny_1xb4-300i-ft-masked_toycity-256x512.py, on the demo's own config
  $PY tools/train.py "$CONFIG" --work-dir "$WORK_DIR/ft_masked" --cfg-options load_from="$CKPT" \
    model.train_cfg.masked_training.exit_mode=cbt model.train_cfg.masked_training.fill=copy \
    train_cfg.max_iters=300 train_cfg.val_interval=300 default_hooks.checkpoint.interval=300 \
    optim_wrapper.optimizer.lr=5e-4 param_scheduler.1.end=300
  $PY tools/analysis_tools/miou_vs_gflops.py "$CONFIG" "$WORK_DIR/ft_masked/iter_300.pth" \
    --out-dir "$WORK_DIR/ft_masked/report" --settings dense cbt:0.9,0.998 cbt:0.8,0.99
fi
echo
echo "checkpoint (with CBT thresholds): $CKPT"
echo "CBT thresholds: $WORK_DIR/cbt_calibration.json, chart: $WORK_DIR/cbt_thresholds.png"
echo "reports: $WORK_DIR/report/miou_vs_gflops.{txt,json,csv,png} (dense features, papers' convention)"
echo "         $WORK_DIR/report_sparse/miou_vs_gflops.{txt,json,csv,png} (sparse masked inference, real wall time)"
echo "exit maps: $WORK_DIR/exit_maps/*_cbt.png (every exit), *_cbt_vs_adpc.png (CBT and ADP-C side by side)"
echo "demo wall time: $(( $(date +%s) - demo_start )) s"
