/**
 * A small review classifier that runs on the CPU: hashed character-trigram and word features, a
 * 1024x128 hidden layer and a 3-way output, plus a sentiment lexicon. Its weights are built from a
 * fixed seed, so nothing is downloaded and every run gives the same answers. A batch of 64 reviews
 * costs about 8.4 million multiply-adds (dense): real work for a batch-inference demo.
 */

export const LABELS = ['negative', 'neutral', 'positive'] as const;
export type Label = (typeof LABELS)[number];

const FEATURES = 1024;
const HIDDEN = 128;

const POSITIVE = ['great', 'excellent', 'love', 'perfect', 'sturdy', 'fast', 'recommend', 'happy', 'works', 'bright'];
const NEGATIVE = ['broke', 'terrible', 'slow', 'refund', 'flimsy', 'disappointed', 'noisy', 'leaks', 'returned', 'awful'];

/** xorshift32: weights from a seed, identical on every machine. */
function random(seed: number): () => number {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) / 4294967296;
  };
}

function hash(text: string): number {
  let value = 2166136261;
  for (let index = 0; index < text.length; index++) value = Math.imul(value ^ text.charCodeAt(index), 16777619);
  return value >>> 0;
}

export interface Prediction {
  label: Label;
  score: number;
}

// The kernels are small module-level functions rather than loops inside predict(): V8 then
// optimizes each as a whole with complete type feedback. One large method was entered through
// on-stack replacement at its hot loop and deoptimized again and again on the cold code after it,
// so the same batch took 18 ms or 33 ms depending on which version happened to run.

/** Hashed trigram and word counts of one text into `features[base..base+FEATURES)`, L2-normalized. */
function featurizeInto(text: string, features: Float32Array, base: number): void {
  const lower = text.toLowerCase();
  const padded = ` ${lower} `;
  for (let index = 0; index + 3 <= padded.length; index++) features[base + (hash(padded.slice(index, index + 3)) % FEATURES)] += 1;
  for (const word of lower.split(/\W+/)) if (word) features[base + (hash(word) % FEATURES)] += 2;
  let norm = 0;
  for (let column = 0; column < FEATURES; column++) norm += features[base + column] * features[base + column];
  const inverse = norm > 0 ? 1 / Math.sqrt(norm) : 0;
  for (let column = 0; column < FEATURES; column++) features[base + column] *= inverse;
}

/**
 * hidden = relu(input x W + b). W is stored unit-major, so each hidden unit is one dot product
 * over contiguous memory, accumulated in a register.
 */
function denseRelu(input: Float32Array, rows: number, weights: Float32Array, bias: Float32Array, hidden: Float32Array): void {
  for (let row = 0; row < rows; row++) {
    const inputBase = row * FEATURES;
    for (let unit = 0; unit < HIDDEN; unit++) {
      const weightBase = unit * FEATURES;
      let sum = bias[unit];
      for (let feature = 0; feature < FEATURES; feature++) sum += input[inputBase + feature] * weights[weightBase + feature];
      hidden[row * HIDDEN + unit] = sum > 0 ? sum : 0;
    }
  }
}

/** One row's output logits from its hidden activations. */
function outputLogits(hidden: Float32Array, row: number, weights: Float32Array, logits: Float64Array): void {
  logits.fill(0);
  for (let unit = 0; unit < HIDDEN; unit++) {
    const value = hidden[row * HIDDEN + unit];
    for (let label = 0; label < LABELS.length; label++) logits[label] += value * weights[unit * LABELS.length + label];
  }
}

export class ReviewClassifier {
  readonly #hiddenWeights: Float32Array;
  readonly #hiddenBias: Float32Array;
  readonly #outputWeights: Float32Array;
  readonly #lexicon = new Map<string, number>();

  constructor(seed = 7) {
    const next = random(seed);
    const scale = Math.sqrt(2 / FEATURES);
    this.#hiddenWeights = Float32Array.from({ length: FEATURES * HIDDEN }, () => (next() * 2 - 1) * scale);
    this.#hiddenBias = Float32Array.from({ length: HIDDEN }, () => (next() * 2 - 1) * 0.01);
    this.#outputWeights = Float32Array.from({ length: HIDDEN * LABELS.length }, () => (next() * 2 - 1) * Math.sqrt(2 / HIDDEN));
    for (const word of POSITIVE) this.#lexicon.set(word, 1);
    for (const word of NEGATIVE) this.#lexicon.set(word, -1);
  }

  /** Hashed trigram and word counts, L2-normalized, one row per text. */
  featurize(texts: readonly string[]): Float32Array {
    const features = new Float32Array(texts.length * FEATURES);
    for (let row = 0; row < texts.length; row++) featurizeInto(texts[row], features, row * FEATURES);
    return features;
  }

  #sentiment(text: string): number {
    let sentiment = 0;
    for (const word of text.toLowerCase().split(/\W+/)) sentiment += this.#lexicon.get(word) ?? 0;
    return sentiment;
  }

  predict(texts: readonly string[]): Prediction[] {
    const rows = texts.length;
    const hidden = new Float32Array(rows * HIDDEN);
    denseRelu(this.featurize(texts), rows, this.#hiddenWeights, this.#hiddenBias, hidden);
    const logits = new Float64Array(LABELS.length);
    const predictions: Prediction[] = [];
    for (let row = 0; row < rows; row++) {
      outputLogits(hidden, row, this.#outputWeights, logits);
      const sentiment = this.#sentiment(texts[row]);
      logits[0] -= 2 * sentiment;
      logits[2] += 2 * sentiment;
      logits[1] += sentiment === 0 ? 1 : 0;
      const max = Math.max(logits[0], logits[1], logits[2]);
      let total = 0;
      let best = 0;
      for (let label = 0; label < LABELS.length; label++) {
        logits[label] = Math.exp(logits[label] - max);
        total += logits[label];
        if (logits[label] > logits[best]) best = label;
      }
      predictions.push({ label: LABELS[best], score: logits[best] / total });
    }
    return predictions;
  }
}

const SUBJECTS = ['The kettle', 'This lamp', 'The blender', 'My new chair', 'The charger', 'This backpack', 'The headset', 'The vacuum'];
const OPINIONS = [
  'works great and I would recommend it',
  'broke after a week and I asked for a refund',
  'arrived on time',
  'is sturdy, fast and bright',
  'feels flimsy and is noisy',
  'is exactly as described',
  'leaks and I am disappointed',
  'is perfect, I love it',
];

/** A synthetic review, the same for the same id everywhere. */
export function reviewText(id: number): string {
  const next = random(id * 2654435761 + 1);
  const subject = SUBJECTS[Math.floor(next() * SUBJECTS.length)];
  const opinion = OPINIONS[Math.floor(next() * OPINIONS.length)];
  const extra = OPINIONS[Math.floor(next() * OPINIONS.length)];
  return next() < 0.5 ? `${subject} ${opinion}.` : `${subject} ${opinion}, and it ${extra}.`;
}
