/**
 * A driver leaves no segment, spill directory, socket or worker behind however it ends; what a
 * SIGKILL leaves, the next driver of the host removes.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { init, shutdown } from '../../lib/index.js';
import { onProcessExit, removeStaleEntries } from '../../lib/process-exit.js';
import { isAlive, scratch, scriptArgs, until } from './helpers.js';

const driver = fileURLToPath(new URL('./fixtures/exit-driver.ts', import.meta.url));

interface Ending {
  code: number | null;
  signal: NodeJS.Signals | null;
  pid: number;
  stdout: string;
  stderr: string;
  segment: string;
  workers: number[];
}

/** Runs the driver in `mode`; once it has reported, sends it `signal` (if any); resolves when it ended. */
function runDriver(mode: string, signal?: NodeJS.Signals): Promise<Ending> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...scriptArgs(driver), mode], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let report: { segment: string; workers: number[] } | undefined;
    child.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      const line = stdout.split('\n').find((text) => text.startsWith('{'));
      if (!report && line && stdout.includes(`${line}\n`)) {
        report = JSON.parse(line);
        if (signal) child.kill(signal);
      }
    });
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const guard = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.once('error', reject);
    child.once('close', (code, endSignal) => {
      clearTimeout(guard);
      if (!report) reject(new Error(`the ${mode} driver ended (${code ?? endSignal}) before it reported: ${stderr}`));
      else resolve({ code, signal: endSignal, pid: child.pid!, stdout, stderr, ...report });
    });
  });
}

/** What a driver of `pid` may leave in the temp directory and /dev/shm. */
function entriesOf(pid: number): string[] {
  const prefix = `trellis-${pid}-`;
  return [...readdirSync(tmpdir()).filter((name) => name.startsWith(prefix)), ...readdirSync('/dev/shm').filter((name) => name.startsWith(prefix)).map((name) => `/dev/shm/${name}`)];
}

async function expectNothingLeft(ending: Ending): Promise<void> {
  expect(entriesOf(ending.pid), `${ending.stderr}`).toEqual([]);
  expect(existsSync(join('/dev/shm', ending.segment))).toBe(false);
  // Workers notice their driver's socket close and exit on their own.
  for (const worker of ending.workers) await until(() => !isAlive(worker), `worker ${worker} of the driver to exit`);
}

describe('a driver that ends without shutdown()', () => {
  afterEach(async () => {
    await shutdown();
  });

  it("removes its segment, spill directory and socket at process.exit(), an uncaught error, or a signal no one handles, and dies by that signal; a SIGKILLed one's are removed by the next driver", async () => {
    const [exited, thrown, terminated, interrupted, handled, killed] = await Promise.all([
      runDriver('exit'),
      runDriver('throw'),
      runDriver('wait', 'SIGTERM'),
      runDriver('wait', 'SIGINT'),
      runDriver('handled', 'SIGTERM'),
      runDriver('wait', 'SIGKILL'),
    ]);
    expect([exited.code, exited.signal]).toEqual([0, null]);
    expect(thrown.code).toBe(1);
    expect(thrown.stderr).toContain('the driver failed');
    // The same ending as without trellis: the signal's default action, not an exit code.
    expect([terminated.code, terminated.signal]).toEqual([null, 'SIGTERM']);
    expect([interrupted.code, interrupted.signal]).toEqual([null, 'SIGINT']);
    // A program's own listener decides: trellis neither ends the process nor cleans up under it.
    expect(handled.stdout).toContain('handling SIGTERM');
    expect([handled.code, handled.signal]).toEqual([7, null]);
    for (const ending of [exited, thrown, terminated, interrupted, handled]) await expectNothingLeft(ending);
    // What a SIGKILLed driver left, the host's next driver removes.
    expect(killed.signal).toBe('SIGKILL');
    for (const worker of killed.workers) await until(() => !isAlive(worker), `worker ${worker} of the killed driver to exit`);
    await init({ numCpus: 1 });
    expect(entriesOf(killed.pid)).toEqual([]);
  });
});

describe('removeStaleEntries and onProcessExit', () => {
  it("removes only the matching entries whose owner's pid is dead", () => {
    const directory = scratch();
    const root = join(directory.path('stale'));
    mkdirSync(root);
    try {
      const dead = spawnSync(process.execPath, ['-e', '']).pid!;
      expect(isAlive(dead)).toBe(false);
      mkdirSync(join(root, `trellis-${dead}-0123456789ab-spill`));
      writeFileSync(join(root, `trellis-${dead}-0123456789ab-spill`, 'object'), 'x');
      writeFileSync(join(root, `trellis-${dead}-01234567.sock`), '');
      writeFileSync(join(root, `trellis-${process.pid}-01234567.sock`), '');
      writeFileSync(join(root, `other-${dead}`), '');
      const removed = removeStaleEntries(root, /^trellis-(\d+)-[0-9a-f]+(?:-spill|\.sock)$/);
      expect(removed.sort()).toEqual([`trellis-${dead}-01234567.sock`, `trellis-${dead}-0123456789ab-spill`]);
      expect(readdirSync(root).sort()).toEqual([`other-${dead}`, `trellis-${process.pid}-01234567.sock`]);
    } finally {
      directory.cleanup();
    }
  });

  it('holds signal listeners only while a cleanup is pending', () => {
    const before = process.listenerCount('SIGTERM');
    const forgetFirst = onProcessExit(() => undefined);
    const forgetSecond = onProcessExit(() => undefined);
    expect(process.listenerCount('SIGTERM')).toBe(before + 1);
    forgetFirst();
    expect(process.listenerCount('SIGTERM')).toBe(before + 1);
    forgetSecond();
    expect(process.listenerCount('SIGTERM')).toBe(before);
  });
});
