#!/usr/bin/env bash
# Hosted vitlens: the Streamlit app plus one capture worker per device, restarted if it dies.
#
#   VITLENS_WORKER_DEVICES  devices, one worker each (default "auto": CUDA when present, else CPU),
#                           e.g. "cuda:0 cuda:1" for one worker per GPU
#   VITLENS_WORKER_ARGS     extra `python -m vitlens worker` options, e.g. "--precision bf16"
#   VITLENS_ADDRESS, PORT   where the app listens (default 0.0.0.0:8501)
#   VITLENS_SECRETS         Streamlit secrets file with an [auth] section for sign-in (default
#                           /data/secrets.toml; sign-in stays off while it does not exist)
# Any other VITLENS_* setting is read by both (see docs/hosting.md). SIGTERM stops everything;
# workers finish their running batch first.
set -uo pipefail
export VITLENS_MODE="${VITLENS_MODE:-hosted}"
read -r -a devices <<< "${VITLENS_WORKER_DEVICES:-auto}"
read -r -a worker_args <<< "${VITLENS_WORKER_ARGS:-}"
pids=()  # pids[i] runs the worker on devices[i]
stopping=0

start_worker() {
  python -m vitlens worker --device "${devices[$1]}" "${worker_args[@]}" &
  pids[$1]=$!
  echo "vitlens: worker $1 on ${devices[$1]} started (pid ${pids[$1]})" >&2
}

stop_all() {
  stopping=1
  kill -TERM "$app" "${pids[@]}" 2>/dev/null
}
trap stop_all TERM INT

for i in "${!devices[@]}"; do start_worker "$i"; done
secrets=()  # sign-in (st.login) is on when an [auth] secrets file is there (docs/hosting.md, "Sign-in")
[ -f "${VITLENS_SECRETS:-/data/secrets.toml}" ] && secrets=(--secrets.files "${VITLENS_SECRETS:-/data/secrets.toml}")
streamlit run app/main.py --server.address "${VITLENS_ADDRESS:-0.0.0.0}" --server.port "${PORT:-8501}" "${secrets[@]}" &
app=$!

while [ "$stopping" = 0 ]; do
  wait -n "$app" "${pids[@]}"
  [ "$stopping" = 1 ] && break
  if ! kill -0 "$app" 2>/dev/null; then
    echo "vitlens: the app exited; stopping" >&2
    stop_all
    break
  fi
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "vitlens: worker $i on ${devices[$i]} exited; restarting in 2 s (its jobs go back to the queue)" >&2
      sleep 2
      start_worker "$i"
    fi
  done
done
wait
