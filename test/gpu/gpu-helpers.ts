/**
 * Plumbing for the native GPU tests: scenarios (fixtures/gpu-scenarios.ts) run in child processes,
 * so each loads the CUDA driver and NCCL fresh under the environment the test gives it (a failed
 * or fake dlopen never leaks into another test); and the fake driver (fake/fake_gpu.cc), compiled
 * once per content of its sources where a C++ compiler is present.
 */
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { scriptArgs } from '../core/helpers.js';

const here = dirname(fileURLToPath(import.meta.url));
const scenarios = join(here, 'fixtures', 'gpu-scenarios.ts');

export interface ScenarioRun {
  code: number | null;
  stderr: string;
  /** The scenario's JSON report (its last stdout line). */
  report: any;
}

/** Runs a scenario; `env` is added to (or, with `undefined` values, removed from) this process's. */
export function runScenario(name: string, args: string[] = [], env: Record<string, string | undefined> = {}, timeoutMs = 120_000): Promise<ScenarioRun> {
  const childEnv: NodeJS.ProcessEnv = { ...process.env };
  for (const key of ['TRELLIS_CUDA_DRIVER', 'TRELLIS_NCCL_LIBRARY']) delete childEnv[key];
  for (const [key, value] of Object.entries(env)) {
    if (value === undefined) delete childEnv[key];
    else childEnv[key] = value;
  }
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--expose-gc', ...scriptArgs(scenarios), name, ...args], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout.on('data', (chunk) => (stdout += chunk));
    child.stderr.on('data', (chunk) => (stderr += chunk));
    child.on('error', reject);
    child.on('exit', (code) => {
      clearTimeout(timer);
      const last = stdout.trim().split('\n').pop() ?? '';
      let report: unknown;
      try {
        report = last ? JSON.parse(last) : undefined;
      } catch {
        report = undefined;
      }
      resolve({ code, stderr, report });
    });
  });
}

/** Runs a scenario that must succeed, and returns its report (stderr in the failure message). */
export async function scenario(name: string, args: string[] = [], env: Record<string, string | undefined> = {}, timeoutMs?: number): Promise<any> {
  const run = await runScenario(name, args, env, timeoutMs);
  if (run.code !== 0) throw new Error(`scenario ${name} exited with ${run.code}:\n${run.stderr}`);
  return run.report;
}

/**
 * The fake CUDA driver + NCCL + cuBLAS library, compiled once per content of its sources (and the
 * kernels it emulates) and kept in the temp directory: a compile costs about 5 s of CPU, and seven
 * test files load it. Undefined (with the reason) where it cannot be compiled.
 */
export function buildFakeGpu(): { path?: string; reason?: string } {
  const compiler = process.env.CXX ?? 'g++';
  const sources = [join(here, 'fake', 'fake_gpu.cc'), join(here, 'fake', 'fake_kernels.cc')];
  const inputs = [
    ...readdirSync(join(here, 'fake')).filter((name) => /\.(cc|h)$/.test(name)).sort().map((name) => join(here, 'fake', name)),
    join(here, '..', '..', 'native', 'kernels', 'cuda', 'decoder_kernels.cu'),
  ];
  const hash = createHash('sha256').update(compiler);
  for (const input of inputs) hash.update(input).update(readFileSync(input));
  const cache = join(tmpdir(), 'trellis-fake-gpu', hash.digest('hex').slice(0, 24));
  const out = join(cache, 'libfake_gpu.so');
  if (existsSync(out)) return { path: out };
  try {
    mkdirSync(cache, { recursive: true });
    // Made under a name of its own and renamed into place: a reader never sees half a library.
    const partial = join(cache, `libfake_gpu.${process.pid}.${Date.now()}.so`);
    // The decoder's CUDA kernels run emulated (fake_kernels.cc): -O2 keeps their fibers quick.
    execFileSync(compiler, ['-std=c++17', '-O2', '-shared', '-fPIC', '-o', partial, ...sources, '-lpthread'], { stdio: 'pipe' });
    renameSync(partial, out);
    return { path: out };
  } catch (error) {
    return { reason: `could not compile the fake GPU library with ${compiler}: ${(error as Error).message}` };
  }
}
