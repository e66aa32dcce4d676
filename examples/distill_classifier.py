"""Distill a sequence classifier into a student with fewer layers, through the Python API.

The same steps `compress distill` takes, one call each, so they can be changed or reused (a pruning or
quantization-aware training loop calls ``distill`` with its own student):

    python examples/distill_classifier.py --teacher DIR --data train.csv --labeled test.csv --out student
    python examples/distill_classifier.py --teacher DIR --data demo --out student   # the demo task
"""

import argparse
import shutil

import compress
from compress import DistillConfig, EvalConfig, StudentConfig
from compress.distill import classification_data, derive_student, distill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="a sequence-classifier folder (make one with compress finetune)")
    parser.add_argument("--data", required=True, help="labeled .csv/.jsonl, or demo")
    parser.add_argument("--labeled", help="held-out labeled file (the demo task has its own)")
    parser.add_argument("--out", default="example-student", help="output folder (replaced if it exists)")
    parser.add_argument("--layers", type=int, default=None, help="layers to keep (default: half)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--steps", type=int, help="optimizer steps instead of epochs")
    parser.add_argument("--quick", action="store_true", help="a short evaluation (for smoke tests)")
    args = parser.parse_args()

    # 1. the teacher, and a student made from it: every other layer kept, weights copied
    teacher = compress.load(args.teacher)
    student = derive_student(teacher.model, StudentConfig(layers=args.layers))
    print(f"student keeps teacher layers {student.kept}")

    # 2. tokenized examples with the teacher's label ids
    label2id = {str(k): int(v) for k, v in teacher.config.label2id.items()}
    data = classification_data(teacher.tokenizer, args.data, label2id, teacher.config.num_labels, 128,
                               eval_source=args.labeled)
    print(data.describe())

    # 3. train: T^2-scaled soft targets mixed with the hard labels, plus the hidden-state MSE
    config = DistillConfig(task="classify", temperature=2.0, alpha=0.5, hidden_weight=1.0, epochs=args.epochs,
                           steps=args.steps, batch_size=16 if args.quick else 32, evaluate=not args.quick)
    checkpoints = args.out + ".checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)
    result = distill(teacher, student, data, config, output_dir=checkpoints, progress=not args.quick)
    shutil.rmtree(args.out, ignore_errors=True)
    result.save(args.out)
    shutil.rmtree(checkpoints, ignore_errors=True)

    # 4. teacher against student: parameters, size, latency, accuracy
    labeled = args.labeled or (str(data.eval_file) if data.eval_file else None)
    quick = dict(samples=16, repeats=1, warmup=0, latency_seqlen=32) if args.quick else {}
    print(compress.compare([args.teacher, args.out], EvalConfig(labeled=labeled, **quick)).table())


if __name__ == "__main__":
    main()
