/** Routing a mixture of experts' tokens, shared by the CPU decoder and the device path so both route alike. */

/**
 * Each row's topK experts by the router's softmax (ties to the lower index, as torch.topk does
 * here), as the rows each expert takes, ascending, and each row's weight there: the probability,
 * over the topK's sum when normalized. In double, so every backend routes alike from the same logits.
 */
export function routeExperts(logits: Float32Array, total: number, count: number, topK: number, normalizeTopK: boolean): { rowsOf: number[][]; weightsOf: number[][] } {
  const rowsOf: number[][] = Array.from({ length: count }, () => []);
  const weightsOf: number[][] = Array.from({ length: count }, () => []);
  const probabilities = new Float64Array(count);
  const taken = new Uint8Array(count);
  for (let row = 0; row < total; row++) {
    const scores = logits.subarray(row * count, (row + 1) * count);
    let maximum = -Infinity;
    for (const score of scores) if (score > maximum) maximum = score;
    let sum = 0;
    for (let expert = 0; expert < count; expert++) sum += probabilities[expert] = Math.exp(scores[expert] - maximum);
    taken.fill(0);
    const picked: number[] = [];
    let pickedSum = 0;
    for (let choice = 0; choice < topK; choice++) {
      let best = -1;
      for (let expert = 0; expert < count; expert++) if (!taken[expert] && (best < 0 || probabilities[expert] > probabilities[best])) best = expert;
      taken[best] = 1;
      picked.push(best);
      pickedSum += probabilities[best];
    }
    for (const expert of picked) {
      rowsOf[expert].push(row);
      weightsOf[expert].push(probabilities[expert] / (normalizeTopK ? pickedSum : sum));
    }
  }
  return { rowsOf, weightsOf };
}
