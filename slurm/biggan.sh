#!/usr/bin/env bash
# Sparse BigGAN on Slurm: one task per node, each starting `accelerate launch` for that node's processes; stops
# before the time limit with a checkpoint, requeues itself and resumes from the run directory.
#
# Submit from the repository root (the launcher configs are read from ./launchers):
#   sbatch slurm/biggan.sh                                          # 1 node x 8 GPUs, imagenet128.yaml
#   sbatch --nodes 4 --gpus-per-node 8 --time 24:00:00 slurm/biggan.sh
#   CONFIG=cifar10.yaml RUN_DIR=/shared/runs/c10 sbatch --gpus-per-node 1 slurm/biggan.sh --train.steps=200000
#   sbatch slurm/biggan.sh --config cifar10.yaml --run_dir /shared/runs/c10 --train.g_lr=1e-4
#   SGTRAIN_CPU=1 GPUS_PER_NODE=2 sbatch --gpus-per-node 0 slurm/biggan.sh --config digits.yaml   # CPUs, gloo
#
# Variables (from the environment at submission; sbatch exports it to the job and keeps it for every restart):
#   CONFIG          sgtrain config, a file or a name in sgtrain/configs/ (imagenet128.yaml); or --config below
#   RUN_DIR         run directory on storage every node sees (runs/<config name>); or --run_dir below. Checkpoints,
#                   metrics.jsonl and samples go there; every start resumes from its latest checkpoint
#   GPUS_PER_NODE   processes per node, one per GPU (sbatch's --gpus-per-node, else 8)
#   SGTRAIN_CPU=1   CPU processes over gloo instead of GPUs (tests, laptops; pass --gpus-per-node 0 to sbatch)
#   PYTHON          the interpreter with sgtrain installed, e.g. .venv/bin/python (python)
#   MASTER_PORT     rendezvous port on the first node (20000 + job id % 10000: the same on every node without
#                   talking, below Linux's ephemeral ports 32768+ that outgoing connections take)
#   SGTRAIN_ROOT    where launchers/ is (the submission directory)
# Arguments after the script name go to sgtrain unchanged, except --config and --run_dir (also as --x=value),
# which set CONFIG and RUN_DIR.
#
# Requeue: Slurm sends SIGUSR1 to this batch shell 120 s before the time limit (--signal=B:USR1@120; so does
# `scancel --signal=USR1 --batch JOBID`). It reaches only this shell, and `accelerate launch` would not forward it to
# the trainers anyway, so the trap touches $SGTRAIN_STOP_FILE, a file on this node (node 0, where rank 0 runs) that
# every trainer process watches. The ranks agree to stop after the same step, write one checkpoint of it, delete the
# file and exit 75. This shell then requeues the job (`scontrol requeue`; the job keeps its id and its log, opened
# in append mode) and the next start resumes from RUN_DIR. A run that reaches its last step exits 0: no requeue.
# Facts measured on Slurm 22.05 (Debian 12; tests/test_slurm.py runs this script on a real one-node cluster):
# - `accelerate launch` with more than one process (torch's elastic agent) exits 1, not 75, when its workers exit
#   75, and logs a ChildFailedError traceback naming "exitcode: 75" (expected at every stop). A stop is therefore
#   recognised by its acknowledgement: the trainer deletes the stop file once the checkpoint is written. A file
#   still there means the trainer failed before stopping: no requeue, the job fails with the trainer's exit code.
# - `scontrol requeue` from inside the batch script works (JobRequeue=1 or --requeue) and cancels this script at
#   once ("CANCELLED ... DUE TO JOB REQUEUE"): the last line is printed before it.
# - The requeued job is not eligible to start before the cluster's credential lifetime has passed
#   (AuthInfo=cred_expire, 120 s by default); it starts with SLURM_RESTART_COUNT=1, 2, ...
# - `sbatch --wait` keeps waiting across requeues and returns the exit code of the last start.
#
#SBATCH --job-name=biggan
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail # not -e: the trainer's exit code is examined below

EXIT_STOPPED=75 # sgtrain.stopping.EXIT_STOPPED: stopped on request after a checkpoint
me="biggan.sh: job ${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch} restart ${SLURM_RESTART_COUNT:-0}"

# The stop file, first of all, so that a signal arriving during start-up is not lost.
export SGTRAIN_STOP_FILE="${SGTRAIN_STOP_FILE:-/tmp/sgtrain-stop.$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}}"
rm -f "$SGTRAIN_STOP_FILE" # a stale request must not stop this start at once
requested=0
# shellcheck disable=SC2317 # run by the trap
on_usr1() {
    requested=1
    echo "$me: SIGUSR1: asking the trainer to checkpoint and stop ($SGTRAIN_STOP_FILE)"
    touch "$SGTRAIN_STOP_FILE"
}
trap on_usr1 USR1

CONFIG="${CONFIG:-imagenet128.yaml}"
RUN_DIR="${RUN_DIR:-}"
train_args=()
while (($#)); do
    case "$1" in
    --config) CONFIG="${2:?--config needs a value}" && shift ;;
    --config=*) CONFIG="${1#*=}" ;;
    --run_dir) RUN_DIR="${2:?--run_dir needs a value}" && shift ;;
    --run_dir=*) RUN_DIR="${1#*=}" ;;
    *) train_args+=("$1") ;;
    esac
    shift
done
config_name="$(basename "$CONFIG")"
RUN_DIR="${RUN_DIR:-runs/${config_name%.*}}"
slurm_gpus="${SLURM_GPUS_PER_NODE:-}"
slurm_gpus="${slurm_gpus##*:}" # "a100:8" -> "8"
[[ $slurm_gpus =~ ^[1-9][0-9]*$ ]] || slurm_gpus=8
GPUS_PER_NODE="${GPUS_PER_NODE:-$slurm_gpus}"
PYTHON="${PYTHON:-python}"
SGTRAIN_ROOT="${SGTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
nodes="${SLURM_NNODES:-1}"
# Every node computes the same port from the job id; the first node of the allocation is rank 0's host.
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"

if [[ ${SGTRAIN_CPU:-0} == 1 ]]; then
    # use_cpu in the config makes the workers join one gloo group; --cpu would start a single process instead.
    export ACCELERATE_USE_CPU=1
    launch_config="$SGTRAIN_ROOT/launchers/cpu_2proc.yaml"
else
    launch_config="$SGTRAIN_ROOT/launchers/multinode.yaml"
fi
if [[ ! -f $launch_config ]]; then
    echo "$me: error: $launch_config not found: submit from the repository root or set SGTRAIN_ROOT" >&2
    exit 2
fi

echo "$me: $(date -Is): $nodes node(s) ($SLURM_JOB_NODELIST) x $GPUS_PER_NODE processes, master" \
    "$MASTER_ADDR:$MASTER_PORT, config $CONFIG, run dir $RUN_DIR"

# srun starts one task per node; the node's rank ($SLURM_NODEID) is only known inside that task, hence bash -c.
# --whole gives the task every CPU and GPU the job holds on its node (a step gets one CPU per task otherwise).
# shellcheck disable=SC2016 # expanded by the inner bash, on each node
srun --ntasks-per-node=1 --whole --kill-on-bad-exit=1 \
    bash -c 'exec "$1" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "${@:2}"' _ "$PYTHON" \
    --config_file "$launch_config" --num_machines "$nodes" --num_processes "$((nodes * GPUS_PER_NODE))" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    -m sgtrain --config "$CONFIG" --run_dir="$RUN_DIR" "${train_args[@]}" &
srun_pid=$!
# A trapped signal makes `wait` return early (status 128 + signal): wait again until srun is really gone. Bash keeps
# the exit status of a reaped child, so the last `wait` returns srun's own.
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid"
done
wait "$srun_pid"
rc=$?

if ((rc == 0)); then
    echo "$me: finished (exit 0)"
    rm -f "$SGTRAIN_STOP_FILE" # a request that came after the last step
    exit 0
fi
if ((rc == EXIT_STOPPED)) || { ((requested)) && [[ ! -e $SGTRAIN_STOP_FILE ]]; }; then
    # The line comes first: `scontrol requeue` ends this script at once.
    echo "$me: stopped after a checkpoint (exit $rc); requeued, the next start resumes from $RUN_DIR"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "$me: error: scontrol requeue failed (submitted with --no-requeue?): resubmit to resume" >&2
    exit "$EXIT_STOPPED"
fi
echo "$me: failed (exit $rc)" >&2
rm -f "$SGTRAIN_STOP_FILE"
exit "$rc"
