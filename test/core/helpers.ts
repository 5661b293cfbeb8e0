/** Helpers shared by the core suite (not a test file, not imported by workers). */
import { mkdtempSync, readdirSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { compiledTwin, freshLibraryBuild } from '../../lib/core/worker-loader.js';

/** A scratch directory for gate and marker files; `cleanup()` removes it. */
export function scratch(): { path: (name: string) => string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'trellis-core-test-'));
  let next = 0;
  return {
    path: (name: string) => join(dir, `${name}-${next++}`),
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

export function openGate(path: string): void {
  writeFileSync(path, '');
}

/**
 * Polls until `condition` holds. A hang guard only: tests wait for states, never for durations,
 * and the guard is far above anything a passing run needs.
 */
export async function until(condition: () => boolean, what: string, guardMs = 20_000): Promise<void> {
  const deadline = Date.now() + guardMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

export function started(gate: string): boolean {
  return existsSync(`${gate}.started`);
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}

export function shmSegments(): string[] {
  try {
    return readdirSync('/dev/shm').filter((name) => name.startsWith('trellis-'));
  } catch {
    return [];
  }
}

/** Socket files this process's clusters create: trellis-<pid>-*.sock in the temp directory. */
export function ownSockets(): string[] {
  const prefix = `trellis-${process.pid}-`;
  return readdirSync(tmpdir()).filter((name) => name.startsWith(prefix) && name.endsWith('.sock'));
}

/** Awaits a promise expected to reject, returning the error (fails the test if it resolves). */
export async function rejection(promise: Promise<unknown>): Promise<any> {
  let value: unknown;
  try {
    value = await promise;
  } catch (error) {
    return error;
  }
  throw new Error(`expected a rejection, got ${JSON.stringify(value)}`);
}

/**
 * The Node.js arguments that run trellis's command line (a node agent, a job submission): the
 * checkout's build where it is fresh, which starts in half the CPU, else the sources through tsx.
 */
export const trellisCli: string[] = (() => {
  const build = freshLibraryBuild();
  return build ? [join(build.build, 'cli', 'trellis.js')] : ['--import', 'tsx', join(import.meta.dirname, '../../lib/cli/trellis.ts')];
})();

/**
 * The Node.js arguments that run a TypeScript script of the tests (a driver, a GPU scenario) that
 * imports the library's index: with a fresh build, the library is loaded from it before tsx
 * registers (a module loaded under tsx's hooks costs a message to its thread), and the script's
 * imports of lib/ go to those built modules (lib/core/library-build-hooks.ts), as its workers'
 * do; else tsx alone.
 */
export const typeScriptArgs: string[] = (() => {
  const build = freshLibraryBuild();
  if (!build) return ['--import', 'tsx'];
  const hooks = pathToFileURL(join(build.build, 'core', 'library-build-hooks.js')).href;
  const data = { sources: pathToFileURL(build.sources + '/').href, build: pathToFileURL(build.build + '/').href };
  const registration = `import { register } from 'node:module'; register(${JSON.stringify(hooks)}, { data: ${JSON.stringify(data)} });`;
  return [
    '--import', pathToFileURL(join(build.build, 'index.js')).href,
    '--import', 'tsx',
    '--import', `data:text/javascript,${encodeURIComponent(registration)}`,
  ];
})();

/**
 * The Node.js arguments that run the tests' TypeScript script at `path`: its compiled twin where
 * fresh (test/twins.ts), started natively as the library's build, else the script through
 * typeScriptArgs.
 */
export function scriptArgs(path: string): string[] {
  const twin = compiledTwin(pathToFileURL(path).href);
  return twin ? [fileURLToPath(twin)] : [...typeScriptArgs, path];
}
