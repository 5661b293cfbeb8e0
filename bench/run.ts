/**
 * Benchmark runner: `npm run bench -- <suite...> [--json]`. Prints a table and each suite's ratios
 * against the floor it measured in the same run; with --json, one JSON object per suite:
 * {"suite": "...", "results": {"<metric>": {"value": <number>, "unit": "..."}}}.
 */
import { callsSuite } from './calls.js';
import { coreSuite } from './core.js';
import { dagSuite } from './dag.js';
import { dataSuite } from './data.js';
import { gpuSuite } from './gpu.js';
import { httpSuite } from './http.js';
import { imagesSuite } from './images.js';
import { llmSuite } from './llm.js';
import { llmGpuSuite } from './llm-gpu.js';
import { nodesSuite } from './nodes.js';
import { serveSuite } from './serve.js';
import { storeSuite } from './store.js';
import { storageSuite } from './storage.js';
import { splitSuite } from './split.js';
import type { Suite } from './harness.js';

const suites: Record<string, Suite> = {
  store: storeSuite,
  core: coreSuite,
  calls: callsSuite,
  dag: dagSuite,
  gpu: gpuSuite,
  data: dataSuite,
  http: httpSuite,
  images: imagesSuite,
  llm: llmSuite,
  'llm-gpu': llmGpuSuite,
  nodes: nodesSuite,
  serve: serveSuite,
  storage: storageSuite,
  split: splitSuite,
};

const args = process.argv.slice(2);
const json = args.includes('--json');
const names = args.filter((arg) => !arg.startsWith('--'));
const chosen = names.length === 0 ? Object.keys(suites) : names;

for (const name of chosen) {
  const suite = suites[name];
  if (!suite) {
    console.error(`unknown suite '${name}'; suites: ${Object.keys(suites).join(', ')}`);
    process.exit(2);
  }
  const results = await suite.run();
  if (json) {
    console.log(JSON.stringify({ suite: name, results }));
    continue;
  }
  console.log(`\n${name}`);
  const width = Math.max(...Object.keys(results).map((key) => key.length));
  for (const [metric, { value, unit }] of Object.entries(results)) {
    console.log(`  ${metric.padEnd(width)}  ${String(value).padStart(12)} ${unit}`);
  }
  for (const [label, numerator, denominator, target] of suite.ratios ?? []) {
    if (!results[numerator] || !results[denominator]) continue; // not measured in this run
    const ratio = results[numerator].value / results[denominator].value;
    console.log(`  ratio ${label}: ${ratio.toFixed(2)} (${target ? `target ${target}` : "to the floor measured in the same run"})`);
  }
}
