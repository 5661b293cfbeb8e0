/**
 * Shared test plumbing: stores that are always closed, temp directories that are always removed,
 * child processes that are always stopped, and checks that nothing is left in /dev/shm.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, closeSync, readSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import { ObjectStore, type ObjectStoreOptions } from '../../lib/index.js';
import { scriptArgs } from '../core/helpers.js';

export const MiB = 1 << 20;
export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const fixturesDir = join(dirname(fileURLToPath(import.meta.url)), 'fixtures');

const openStores: ObjectStore[] = [];
const createdNames = new Set<string>();
const tempDirs: string[] = [];
const children = new Set<Fixture>();
let spare: Fixture | undefined;

/** A fresh directory under the OS temp dir, removed by {@link finish}. */
export function tempDir(prefix = 'trellis-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

/** A store with small defaults (16 MiB, spilling to a temp dir), closed by {@link cleanup}. */
export function createStore(options: ObjectStoreOptions = {}): ObjectStore {
  const store = ObjectStore.create({
    capacity: 16 * MiB,
    ...options,
    spillDirectory: options.spillDirectory === undefined ? tempDir('trellis-spill-') : options.spillDirectory,
  });
  openStores.push(store);
  createdNames.add(store.name);
  return store;
}

/** Tracks a store made some other way (an attach, a default-option create) for {@link cleanup}. */
export function track(store: ObjectStore): ObjectStore {
  openStores.push(store);
  if (store.isOwner) createdNames.add(store.name);
  return store;
}

/** A segment name this test file may create, checked by {@link expectNoLeakedSegments}. */
export function segmentName(tag: string): string {
  const name = `trellis-${process.pid}-${tag}-${Math.random().toString(16).slice(2, 10)}`;
  createdNames.add(name);
  return name;
}

/** Stops every child, then closes every store (attachments first, owners last). */
export async function cleanup(): Promise<void> {
  await Promise.all([...children].map((child) => child.stop()));
  const stores = openStores.splice(0);
  for (const store of stores.filter((s) => !s.isOwner)) store.close();
  for (const store of stores.filter((s) => s.isOwner)) store.close();
}

/** Ends the warm spare worker, if any (a spare also exits by itself when this process does). */
export async function stopSpare(): Promise<void> {
  const last = spare;
  spare = undefined;
  await last?.stop();
}

/** For afterAll: stops the spare worker, removes temp dirs, and checks /dev/shm for leftovers. */
export async function finish(): Promise<void> {
  await cleanup();
  await stopSpare();
  removeTempDirs();
  expectNoLeakedSegments();
}

export function removeTempDirs(): void {
  for (const dir of tempDirs.splice(0)) rmSync(dir, { recursive: true, force: true });
}

export function segmentExists(name: string): boolean {
  return existsSync(join('/dev/shm', name));
}

/** Fails if a segment this test file created (or any named after this process) is still there. */
export function expectNoLeakedSegments(): void {
  const mine = `trellis-${process.pid}-`;
  const left = readdirSync('/dev/shm').filter((name) => name.startsWith(mine) || createdNames.has(name));
  expect(left).toEqual([]);
}

/** Compares bytes without printing megabytes on a mismatch; Buffers and Uint8Arrays compare alike. */
export function expectBytes(actual: Uint8Array | null | undefined, expected: Uint8Array, what = 'bytes'): void {
  expect(actual, what).toBeInstanceOf(Uint8Array);
  expect(actual!.byteLength, `${what}: length`).toBe(expected.byteLength);
  const a = Buffer.from(actual!.buffer, actual!.byteOffset, actual!.byteLength);
  const b = Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength);
  if (!a.equals(b)) {
    let i = 0;
    while (a[i] === b[i]) i++;
    expect.fail(`${what}: first difference at byte ${i} of ${b.length} (${a[i]} instead of ${b[i]})`);
  }
}

type ErrorClass = abstract new (...args: never[]) => Error;

/** Runs `fn`, expecting a typed error of `type` with `code`; returns it for further checks. */
export function expectError<T extends ErrorClass>(fn: () => unknown, type: T, code: string): InstanceType<T> {
  let caught: unknown;
  try {
    fn();
  } catch (error) {
    caught = error;
  }
  expect(caught, `expected ${type.name} ${code}`).toBeInstanceOf(type);
  expect((caught as { code?: string }).code).toBe(code);
  return caught as InstanceType<T>;
}

export async function expectRejection<T extends ErrorClass>(promise: Promise<unknown>, type: T, code: string): Promise<InstanceType<T>> {
  let caught: unknown;
  try {
    await promise;
  } catch (error) {
    caught = error;
  }
  expect(caught, `expected ${type.name} ${code}`).toBeInstanceOf(type);
  expect((caught as { code?: string }).code).toBe(code);
  return caught as InstanceType<T>;
}

/** Bytes one object of `size` data bytes (and `metadata` bytes) takes in the store, header included. */
export function blockSize(size: number, metadata = 0): number {
  const align = (value: number) => Math.ceil(value / 64) * 64;
  return align(64 + align(size) + metadata);
}

/** Resolves after `ms` milliseconds (used to let something else happen, never to time anything). */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` until it returns true; fails after `limitMs` (a hang guard, not a timing check). */
export async function waitFor(check: () => boolean, what: string, limitMs = 15_000): Promise<void> {
  const deadline = Date.now() + limitMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}`);
    await sleep(10);
  }
}

/**
 * The thread id that owns the store's process-shared mutex, read from the segment: glibc keeps a
 * robust mutex's owner tid in its first word (masked of FUTEX_WAITERS and FUTEX_OWNER_DIED). The
 * mutex sits at offset 88 of SegmentHeader (native/store/layout.h). Lets a test know that a child
 * really is inside the lock before killing it, without guessing with a sleep.
 */
export function lockOwner(name: string): number {
  const fd = openSync(join('/dev/shm', name), 'r');
  try {
    const word = Buffer.alloc(4);
    readSync(fd, word, 0, 4, 88);
    return word.readUInt32LE(0) & 0x3fffffff;
  } finally {
    closeSync(fd);
  }
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Reply = Record<string, any>;

/**
 * A child process running a fixture with tsx. `request` and `send` speak the worker protocol (see
 * fixtures/worker.ts); `line` waits for a plain line of output (such as 'locked').
 */
export class Fixture {
  readonly child: ChildProcess;
  readonly exited: Promise<Exit>;
  #exit: Exit | undefined;
  #stderr = '';
  #buffer = '';
  #lines: string[] = [];
  #lineWaiters: Array<() => void> = [];
  #pending = new Map<number, { resolve: (reply: Reply) => void; reject: (error: Error) => void }>();
  #seq = 0;

  private constructor(fixture: string, args: string[], nodeArgs: string[]) {
    this.child = spawn(process.execPath, [...nodeArgs, ...scriptArgs(join(fixturesDir, fixture)), ...args], {
      cwd: repoRoot,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    this.child.stdout!.setEncoding('utf8');
    this.child.stdout!.on('data', (chunk: string) => this.#onData(chunk));
    this.child.stderr!.setEncoding('utf8');
    this.child.stderr!.on('data', (chunk: string) => {
      this.#stderr += chunk;
    });
    this.child.stdin!.on('error', () => {});
    this.exited = new Promise<Exit>((resolve) => {
      this.child.on('exit', (code, signal) => {
        this.#exit = { code, signal };
        children.delete(this);
        for (const { reject } of this.#pending.values()) reject(new Error(`child exited (${code ?? signal}) before replying${this.#diagnostics()}`));
        this.#pending.clear();
        this.#wakeLines();
        resolve({ code, signal });
      });
    });
    children.add(this);
  }

  static start(fixture: string, args: string[] = [], options: { exposeGc?: boolean } = {}): Fixture {
    return new Fixture(fixture, args, options.exposeGc ? ['--expose-gc'] : []);
  }

  /**
   * A worker attached to the store `name`. Workers start while earlier tests run (one spare is
   * kept warm): starting node with tsx is most of a worker's cost.
   */
  static async worker(name: string, options: { exposeGc?: boolean } = {}): Promise<Fixture> {
    let worker: Fixture;
    if (options.exposeGc) {
      worker = Fixture.start('worker.ts', [], options);
    } else {
      worker = spare && !spare.#exit ? spare : Fixture.start('worker.ts');
      spare = new Fixture('worker.ts', [], []);
      children.delete(spare); // a spare outlives tests; stopSpare() ends it
    }
    children.add(worker);
    await worker.request('attach', { name });
    return worker;
  }

  get pid(): number {
    return this.child.pid!;
  }

  get stderr(): string {
    return this.#stderr;
  }

  /** Sends a command and resolves with its reply, whether ok or not. */
  send(op: string, params: Reply = {}, limitMs = 30_000): Promise<Reply> {
    if (this.#exit) return Promise.reject(new Error(`child already exited (${this.#exit.code ?? this.#exit.signal})`));
    const seq = ++this.#seq;
    return new Promise<Reply>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(seq);
        reject(new Error(`child did not answer '${op}' within ${limitMs} ms${this.#diagnostics()}`));
      }, limitMs);
      this.#pending.set(seq, {
        resolve: (reply) => {
          clearTimeout(timer);
          resolve(reply);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
      this.child.stdin!.write(`${JSON.stringify({ seq, op, ...params })}\n`);
    });
  }

  /** Sends a command that must succeed. */
  async request(op: string, params: Reply = {}, limitMs?: number): Promise<Reply> {
    const reply = await this.send(op, params, limitMs);
    if (!reply.ok) throw new Error(`child failed '${op}': ${JSON.stringify(reply.error)}${this.#diagnostics()}`);
    return reply;
  }

  /** Waits for a plain (non-JSON) line of output. */
  async line(expected: string, limitMs = 30_000): Promise<void> {
    const deadline = Date.now() + limitMs;
    for (;;) {
      const index = this.#lines.indexOf(expected);
      if (index >= 0) {
        this.#lines.splice(index, 1);
        return;
      }
      if (this.#exit) throw new Error(`child exited (${this.#exit.code ?? this.#exit.signal}) before printing '${expected}'${this.#diagnostics()}`);
      if (Date.now() > deadline) throw new Error(`child did not print '${expected}' within ${limitMs} ms${this.#diagnostics()}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 100);
        this.#lineWaiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<Exit> {
    if (!this.#exit) this.child.kill(signal);
    return this.exited;
  }

  /** Closes stdin (a worker then closes its store and exits 0) and waits; kills it if it hangs. */
  async end(limitMs = 15_000): Promise<Exit> {
    if (this.#exit) return this.#exit;
    this.child.stdin!.end();
    const timer = setTimeout(() => this.child.kill('SIGKILL'), limitMs);
    const exit = await this.exited;
    clearTimeout(timer);
    return exit;
  }

  /** For cleanup: SIGKILLs whatever still runs (its store slot is reaped like any dead process's). */
  async stop(): Promise<void> {
    if (this.#exit) return;
    this.child.kill('SIGKILL');
    await this.exited;
  }

  #onData(chunk: string): void {
    this.#buffer += chunk;
    let newline: number;
    while ((newline = this.#buffer.indexOf('\n')) >= 0) {
      const line = this.#buffer.slice(0, newline);
      this.#buffer = this.#buffer.slice(newline + 1);
      if (line.startsWith('{')) {
        const reply = JSON.parse(line) as Reply;
        const pending = this.#pending.get(reply.seq);
        if (pending) {
          this.#pending.delete(reply.seq);
          pending.resolve(reply);
        }
      } else {
        this.#lines.push(line);
        this.#wakeLines();
      }
    }
  }

  #wakeLines(): void {
    for (const wake of this.#lineWaiters.splice(0)) wake();
  }

  #diagnostics(): string {
    return this.#stderr ? `\nchild stderr:\n${this.#stderr}` : '';
  }
}
