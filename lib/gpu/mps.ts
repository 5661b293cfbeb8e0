/**
 * CUDA's Multi-Process Service for one cluster: a control daemon of its own, in a private pipe
 * directory, whose MPS server the cluster's GPU workers join as clients.
 *
 * Why: each worker process has a GPU context of its own, and a GPU runs one context at a time.
 * The first operation of a reader after its producer's waits for the GPU to switch contexts
 * (about 170 µs on an H200, measured by bench/gpu-probe.ts), which puts a floor under every
 * actor-to-actor transfer on one GPU, whatever the transport. MPS clients share the server's
 * context: no switch, and the work of several actors can overlap on the GPU.
 *
 * The daemon runs in the foreground as this process's child, so it goes with the cluster. A
 * driver killed outright leaves it behind: the next cluster on the host stops daemons whose
 * driver is gone (as the store removes segments whose creator is gone).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { CudaError } from '../errors.js';
import { onProcessExit, processAlive } from '../process-exit.js';

const CONTROL = 'nvidia-cuda-mps-control';
const DIRECTORY_PREFIX = 'trellis-mps-';
/** How long the daemon may take to open its control pipe, and a command to be answered. */
const START_TIMEOUT_MS = 10_000;
const COMMAND_TIMEOUT_MS = 10_000;
/** What the daemon last printed, kept for the error that explains a failed start. */
const OUTPUT_KEPT = 4096;

/** The control program: TRELLIS_MPS_CONTROL, or nvidia-cuda-mps-control on PATH. */
export function findControlProgram(): string | undefined {
  const chosen = process.env.TRELLIS_MPS_CONTROL;
  if (chosen) return chosen;
  for (const directory of (process.env.PATH ?? '').split(delimiter)) {
    if (!directory) continue;
    const candidate = join(directory, CONTROL);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

function unavailable(message: string): CudaError {
  return new CudaError('ERR_MPS_UNAVAILABLE', message, { call: CONTROL });
}

export class MultiProcessService implements AsyncDisposable {
  /** CUDA_MPS_PIPE_DIRECTORY: where clients find the daemon. */
  readonly pipeDirectory: string;
  readonly logDirectory: string;
  readonly #directory: string;
  readonly #program: string;
  readonly #daemon: ChildProcess;
  readonly #exited: Promise<void>;
  #output = '';
  #closed: Promise<void> | undefined;
  #forgetAtExit: () => void = () => undefined;

  private constructor(program: string, directory: string) {
    this.#program = program;
    this.#directory = directory;
    this.pipeDirectory = join(directory, 'pipe');
    this.logDirectory = join(directory, 'log');
    mkdirSync(this.pipeDirectory);
    mkdirSync(this.logDirectory);
    // Without CUDA_VISIBLE_DEVICES: a daemon started under it renumbers the devices its clients
    // see, while each worker names the devices it was given by their host numbers.
    const { CUDA_VISIBLE_DEVICES: _hidden, ...inherited } = process.env;
    this.#daemon = spawn(program, ['-f'], { env: { ...inherited, ...this.environment }, stdio: ['ignore', 'pipe', 'pipe'] });
    const keep = (chunk: Buffer) => {
      this.#output = (this.#output + chunk.toString()).slice(-OUTPUT_KEPT);
    };
    this.#daemon.stdout!.on('data', keep);
    this.#daemon.stderr!.on('data', keep);
    this.#exited = new Promise((resolve) => {
      this.#daemon.once('error', (error) => {
        keep(Buffer.from(String(error.message)));
        resolve();
      });
      this.#daemon.once('exit', () => resolve());
    });
    if (this.#daemon.pid) writeFileSync(join(directory, 'daemon.pid'), String(this.#daemon.pid));
    this.#forgetAtExit = onProcessExit(() => this.#stopNow());
  }

  /**
   * Starts a control daemon and waits until it answers a command. Throws CudaError
   * ERR_MPS_UNAVAILABLE when there is no control program or the daemon does not come up (with
   * what it printed).
   */
  static async start(): Promise<MultiProcessService> {
    const program = findControlProgram();
    if (!program) {
      throw unavailable(`CUDA MPS was asked for, but ${CONTROL} is not on PATH (it comes with the NVIDIA driver's utilities; TRELLIS_MPS_CONTROL names another path)`);
    }
    stopAbandonedDaemons(program);
    const service = new MultiProcessService(program, mkdtempSync(join(tmpdir(), `${DIRECTORY_PREFIX}${process.pid}-`)));
    const deadline = Date.now() + START_TIMEOUT_MS;
    let exited = false;
    void service.#exited.then(() => (exited = true));
    // Ready once it answers (what its pipe directory holds is its own business).
    while (!(await runControl(program, service.environment, 'get_server_list').then(() => true, () => false))) {
      if (exited || Date.now() > deadline) {
        const why = exited ? `exited (${service.#daemon.exitCode ?? service.#daemon.signalCode ?? 'did not start'})` : `did not answer within ${START_TIMEOUT_MS} ms`;
        await service.close();
        throw unavailable(`the CUDA MPS control daemon (${program}) ${why}${service.#output ? `: ${service.#output.trim()}` : ''}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    return service;
  }

  /** What a client process needs in its environment, before it initializes CUDA. */
  get environment(): Record<string, string> {
    return { CUDA_MPS_PIPE_DIRECTORY: this.pipeDirectory, CUDA_MPS_LOG_DIRECTORY: this.logDirectory };
  }

  /**
   * Stops the daemon and its server (call it once the clients are gone: the daemon waits for
   * them), then removes the pipe and log directories. Never hangs: a daemon that does not quit
   * in time is killed.
   */
  close(): Promise<void> {
    this.#closed ??= this.#close();
    return this.#closed;
  }

  async #close(): Promise<void> {
    this.#forgetAtExit();
    if (this.#daemon.exitCode === null && this.#daemon.signalCode === null) {
      await runControl(this.#program, this.environment, 'quit').catch(() => undefined);
      const timer = setTimeout(() => this.#daemon.kill('SIGKILL'), COMMAND_TIMEOUT_MS);
      await this.#exited;
      clearTimeout(timer);
    }
    rmSync(this.#directory, { recursive: true, force: true });
  }

  /** At the driver's exit without shutdown: nothing asynchronous can run any more. */
  #stopNow(): void {
    this.#daemon.kill('SIGTERM');
    rmSync(this.#directory, { recursive: true, force: true });
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** Runs the control program as a client: `line` on its standard input, its answer on output. */
function runControl(program: string, environment: Record<string, string>, line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const client = spawn(program, [], { env: { ...process.env, ...environment }, stdio: ['pipe', 'pipe', 'pipe'] });
    let output = '';
    client.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    client.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    const timer = setTimeout(() => {
      client.kill('SIGKILL');
      reject(new CudaError('ERR_MPS', `${CONTROL} did not answer '${line}' within ${COMMAND_TIMEOUT_MS} ms`, { call: CONTROL }));
    }, COMMAND_TIMEOUT_MS);
    client.once('error', (error) => {
      clearTimeout(timer);
      reject(new CudaError('ERR_MPS', `${CONTROL} could not run: ${error.message}`, { call: CONTROL }));
    });
    client.once('close', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve(output.trim());
      else reject(new CudaError('ERR_MPS', `${CONTROL} answered '${line}' with exit code ${code}: ${output.trim()}`, { call: CONTROL }));
    });
    // A client that finds no daemon exits without reading: its 'close' reports it, not EPIPE.
    client.stdin.on('error', () => undefined);
    client.stdin.end(`${line}\n`);
  });
}

/** Daemons of clusters whose driver died without shutting down: quit them, remove their files. */
function stopAbandonedDaemons(program: string): void {
  let names: string[];
  try {
    names = readdirSync(tmpdir());
  } catch {
    return;
  }
  for (const name of names) {
    const match = new RegExp(`^${DIRECTORY_PREFIX}(\\d+)-`).exec(name);
    if (!match || Number(match[1]) === process.pid || processAlive(Number(match[1]))) continue;
    const directory = join(tmpdir(), name);
    let daemon = 0;
    try {
      daemon = Number(readFileSync(join(directory, 'daemon.pid'), 'utf8'));
    } catch {
      // started and gone before it wrote its pid
    }
    if (daemon > 0 && processAlive(daemon)) {
      // Its server goes with it; its clients went with their driver. Asked, never killed: the
      // pid may since belong to another process.
      const environment = { CUDA_MPS_PIPE_DIRECTORY: join(directory, 'pipe'), CUDA_MPS_LOG_DIRECTORY: join(directory, 'log') };
      void runControl(program, environment, 'quit').catch(() => undefined);
      continue; // its directory goes on a later start, once it has quit
    }
    rmSync(directory, { recursive: true, force: true });
  }
}

