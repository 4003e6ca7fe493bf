"""What a text-to-MNIST latent run does with prompts outside its grammar: negation ("not a
seven"), two digits, words it never saw ("a cat"), a bare numeral. For each prompt, N samples
with the run's sampler, steps and guidance (``config.sampling``), cropped to 28x28 and labelled
by an MNIST classifier; the table gives the share of each digit and the confidence (mean max
softmax; low means the classifier cannot tell what it sees).

    python -m benchmarks.latent_mnist_prompt_probe --workdir runs/latent_mnist \
        --classifier_path runs/mnist/mnist_classifier.msgpack --n 100

The grammar (``experiments.mnist_prompts``) has no negation, no second digit and no words but
its own: the model can only react to the words it knows in such a prompt, which this probe shows.
"""

from __future__ import annotations

import argparse
import platform

PROMPTS = ("a handwritten seven", "not a seven", "anything but a seven", "a seven and a three",
           "7", "a cat", "a photo of a dog", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--classifier_path", required=True)
    ap.add_argument("--n", type=int, default=100, help="samples per prompt")
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")

    import jax
    import numpy as np

    from experiments import latent_data, latent_lib, latent_pipeline
    from jaxdiff.metrics import classify, load_classifier

    run = latent_lib.load_latent_run(args.workdir)
    s = run.config.sampling
    clf = load_classifier(args.classifier_path)
    print(f"Run {args.workdir} at step {run.stats['step']}; sampler {run.sd.sampler.name}, "
          f"{s.num_steps} steps, guidance {s.guidance_scale:g}; N = {args.n} per prompt; "
          f"{platform.processor() or platform.machine()}\n")
    print("| prompt | most frequent digit (share) | second (share) | confidence | digits seen |")
    print("| --- | ---: | ---: | ---: | --- |")
    for i, prompt in enumerate(args.prompts):
        imgs = latent_pipeline.sample(run.sd, [prompt] * args.n,
                                      jax.random.fold_in(jax.random.key(args.seed), i),
                                      num_steps=int(s.num_steps),
                                      guidance_scale=float(s.guidance_scale),
                                      batch_size=min(args.n, 250))
        _, logits = classify(clf, latent_data.crop_images(imgs))
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        hist = np.bincount(logits.argmax(1), minlength=10) / args.n
        top = np.argsort(-hist)
        seen = ", ".join(f"{d}: {hist[d]:.2f}" for d in top if hist[d] > 0)
        print(f"| {prompt or '(empty)'} | {top[0]} ({hist[top[0]]:.2f}) | {top[1]} "
              f"({hist[top[1]]:.2f}) | {p.max(1).mean():.3f} | {seen} |", flush=True)


if __name__ == "__main__":
    main()
