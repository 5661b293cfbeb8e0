/**
 * Jobs of a shared cluster: a user hands the broker a command (a driver script and its
 * arguments) and the broker runs it on its own host, as Ray's job submission runs drivers on
 * the head node. The user's laptop may then go away: the job's output is kept in a log file,
 * and its state (running, succeeded, failed, stopped) with its exit code in a record beside it,
 * both in the broker's jobs directory, so finished jobs outlive a broker restart.
 *
 * The driver learns where the cluster is from its environment: TRELLIS_BROKER (this broker, as
 * its host reaches it), TRELLIS_CLUSTER_TOKEN (the token the job was submitted with, so it joins
 * as the user who submitted it), TRELLIS_JOB_ID and TRELLIS_JOB_NAME; `init({ cluster: {
 * resources } })` needs nothing else. The broker owns its jobs' processes: closing it stops
 * them, and a broker that died with jobs running ends what is left of them when it starts again.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readdirSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { isAbsolute, join } from 'node:path';
import { InvalidArgumentError, TrellisError } from '../errors.js';
import { processAlive } from '../process-exit.js';
import { CodeCache, checkRuntimeEnvironment, packageTotals, type RuntimeEnvironment } from './code-package.js';

/** 'stopping': asked to stop, its processes not yet ended. */
export type JobState = 'running' | 'stopping' | 'succeeded' | 'failed' | 'stopped';

/** What the broker knows of a job. */
export interface JobInfo {
  jobId: string;
  name: string;
  /** The user who submitted it, where the broker has users. */
  user?: string;
  entrypoint: string[];
  cwd: string;
  /** The working directory it was submitted with: its packages' ids and what they hold. */
  workingDir?: { code: string; dependencies?: string; files: number; bytes: number };
  state: JobState;
  pid?: number;
  submittedAt: string;
  endedAt?: string;
  /** The command's exit code, or null when a signal ended it. */
  exitCode?: number | null;
  signal?: string | null;
  /** Why it ended where the command did not say: stopped by whom, the broker stopped, a command that could not start. */
  reason?: string;
}

/** A job to run: its command, where, with what more in its environment. */
export interface JobSubmission {
  /** The command and its arguments, e.g. ['node', 'batch.js', '--date', '2026-11-28']. */
  entrypoint: string[];
  /** Its working directory on the broker's host (default: the broker's own). */
  cwd?: string;
  /** More environment variables for it (the broker's own environment is the base). */
  env?: Record<string, string>;
  /** Its name in job lists and, as its driver's name, in the broker's status (default: the command's script). */
  name?: string;
  /**
   * What the job runs with: `workingDir` (a directory on the submitter's host) is packed and sent
   * with it, the command runs in the broker host's copy, and the job's driver ships it on to
   * every host its workers run on; `env` is set for the driver and all its workers.
   */
  runtimeEnv?: RuntimeEnvironment;
}

/** A working directory's packages as a submission carries them (submitJob packs them). */
export interface UploadedWorkingDirectory {
  code: { id: string; bytes: Uint8Array; files: number; size: number };
  dependencies?: { id: string; bytes: Uint8Array; files: number; size: number };
}

/** How long a stopped job has to end after SIGTERM before SIGKILL. */
const STOP_GRACE_MS = 10_000;
/** The most log text one request returns. */
const MAX_LOG_CHUNK = 1 << 20;

interface JobEntry {
  info: JobInfo;
  child?: ChildProcess;
  ended?: Promise<void>;
  stopTimer?: NodeJS.Timeout;
}

export class JobManager {
  readonly directory: string;
  readonly #jobs = new Map<string, JobEntry>();
  readonly #address: () => string;
  readonly #log: (line: string) => void;
  /** Where submitted working directories are unpacked (shared by jobs with the same files). */
  readonly #code: CodeCache;
  #closed = false;

  /**
   * Opens the jobs directory: earlier jobs are listed again, and one recorded as running (the
   * broker died under it) has what is left of its process group ended and is marked failed.
   */
  constructor(directory: string, options: { address: () => string; log?: (line: string) => void }) {
    this.directory = directory;
    this.#address = options.address;
    this.#log = options.log ?? (() => undefined);
    this.#code = new CodeCache(join(directory, 'code'));
    // Made with the first job: a broker nobody submits to leaves nothing on disk.
    const names = existsSync(directory) ? readdirSync(directory) : [];
    for (const file of names.filter((name) => name.endsWith('.json')).sort()) {
      let info: JobInfo;
      try {
        info = JSON.parse(readFileSync(join(directory, file), 'utf8')) as JobInfo;
      } catch {
        continue; // a record cut short by a crash: nothing to list
      }
      if (info.state === 'running' || info.state === 'stopping') {
        if (info.pid && processAlive(info.pid)) killGroup(info.pid, 'SIGKILL');
        info = { ...info, state: 'failed', endedAt: new Date().toISOString(), reason: 'the broker stopped while it ran' };
        this.#save(info);
      }
      this.#jobs.set(info.jobId, { info });
    }
  }

  /**
   * Starts a job as `user` (undefined: the cluster's own token), whose driver joins with `token`;
   * its working directory's packages (when it has one) are unpacked first.
   */
  async submit(submission: JobSubmission, token: string, user: string | undefined, uploaded?: UploadedWorkingDirectory): Promise<JobInfo> {
    if (this.#closed) throw new TrellisError('ERR_BROKER_CLOSING', 'the broker is shutting down');
    const checked = checkSubmission(submission, uploaded !== undefined);
    const { entrypoint, env, name } = checked;
    let { cwd } = checked;
    let runtimeEnv = checked.runtimeEnv;
    if (uploaded) {
      const { code, dependencies } = uploaded;
      cwd = await this.#code.ensure({ id: code.id, bytes: () => code.bytes }, dependencies && { id: dependencies.id, bytes: () => dependencies.bytes });
      runtimeEnv = { ...runtimeEnv, workingDir: cwd };
      if (this.#closed) throw new TrellisError('ERR_BROKER_CLOSING', 'the broker is shutting down');
    }
    const jobId = `job-${new Date().toISOString().slice(0, 10).replaceAll('-', '')}-${randomBytes(4).toString('hex')}`;
    const info: JobInfo = {
      jobId,
      name: name ?? defaultName(entrypoint),
      ...(user ? { user } : {}),
      entrypoint,
      cwd,
      ...(uploaded
        ? { workingDir: { code: uploaded.code.id, ...(uploaded.dependencies ? { dependencies: uploaded.dependencies.id } : {}), ...packageTotals(uploaded.code, uploaded.dependencies) } }
        : {}),
      state: 'running',
      submittedAt: new Date().toISOString(),
    };
    mkdirSync(this.directory, { recursive: true });
    const logFd = openSync(this.logPath(jobId), 'a');
    let child: ChildProcess;
    try {
      child = spawn(entrypoint[0], entrypoint.slice(1), {
        cwd,
        // A group of its own: a stop reaches whatever the job started.
        detached: true,
        stdio: ['ignore', logFd, logFd],
        env: {
          ...process.env,
          ...runtimeEnv.env,
          ...env,
          TRELLIS_BROKER: this.#address(),
          TRELLIS_CLUSTER_TOKEN: token,
          TRELLIS_JOB_ID: jobId,
          TRELLIS_JOB_NAME: info.name,
          // The driver's init ships the working directory and the variables to its workers.
          ...(Object.keys(runtimeEnv).length > 0 ? { TRELLIS_RUNTIME_ENV: JSON.stringify(runtimeEnv) } : {}),
        },
      });
    } finally {
      closeSync(logFd);
    }
    const entry: JobEntry = { info, child };
    this.#jobs.set(jobId, entry);
    entry.ended = new Promise<void>((resolve) => {
      let done = false;
      const finish = (code: number | null, signal: NodeJS.Signals | null, startFailure?: Error): void => {
        if (done) return;
        done = true;
        clearTimeout(entry.stopTimer);
        entry.child = undefined;
        const stopping = entry.info.state === 'stopping';
        entry.info = {
          ...entry.info,
          state: stopping ? 'stopped' : code === 0 ? 'succeeded' : 'failed',
          endedAt: new Date().toISOString(),
          exitCode: code,
          signal,
          ...(startFailure ? { reason: `it could not start: ${startFailure.message}` } : {}),
        };
        this.#save(entry.info);
        this.#log(`job ${jobId} (${entry.info.name}) ${entry.info.state}${code !== null ? ` with exit code ${code}` : signal ? ` by ${signal}` : ''}`);
        resolve();
      };
      // A command that could not be started has no process, and never closes.
      child.once('error', (error) => {
        if (child.pid === undefined) finish(null, null, error);
      });
      child.once('close', (code, signal) => finish(code, signal));
    });
    if (child.pid !== undefined) info.pid = child.pid;
    this.#save(info);
    this.#log(`job ${jobId} (${info.name}) started${user ? ` for ${user}` : ''}: ${entrypoint.join(' ')}`);
    return { ...info };
  }

  /** The jobs `user` may see (all of them for the cluster's token), oldest first. */
  list(user: string | undefined): JobInfo[] {
    return [...this.#jobs.values()].map((entry) => ({ ...entry.info })).filter((info) => user === undefined || info.user === user);
  }

  /** One job, if `user` may see it; ERR_JOB_NOT_FOUND otherwise (another user's job is not named). */
  get(jobId: unknown, user: string | undefined): JobInfo {
    return { ...this.#entry(jobId, user).info };
  }

  /** Up to 1 MiB of a job's output from byte `offset`, where the next read starts, and whether the job has ended. */
  async logs(jobId: unknown, user: string | undefined, offset: unknown): Promise<{ text: string; next: number; ended: boolean }> {
    const entry = this.#entry(jobId, user);
    const from = offset === undefined ? 0 : offset;
    if (typeof from !== 'number' || !Number.isSafeInteger(from) || from < 0) throw new InvalidArgumentError(`a log offset is a byte count >= 0, got ${String(offset)}`);
    // Read whether it ended first: output written before the end is then all in the file.
    const ended = entry.info.state !== 'running' && entry.info.state !== 'stopping';
    const path = this.logPath(entry.info.jobId);
    if (!existsSync(path)) return { text: '', next: from, ended };
    const handle = await open(path, 'r');
    try {
      const size = (await handle.stat()).size;
      const length = Math.max(0, Math.min(MAX_LOG_CHUNK, size - from));
      const buffer = Buffer.alloc(length);
      const { bytesRead } = length > 0 ? await handle.read(buffer, 0, length, from) : { bytesRead: 0 };
      // Whole characters only: a UTF-8 sequence cut at the end waits for the next read.
      const end = trimmedEnd(buffer, bytesRead, ended && from + bytesRead === size);
      return { text: buffer.subarray(0, end).toString('utf8'), next: from + end, ended: ended && from + end >= size };
    } finally {
      await handle.close();
    }
  }

  /** Stops a running job: SIGTERM to its process group, SIGKILL after 10 s ('stopping' until they end). A job that ended is left as it is. */
  stop(jobId: unknown, user: string | undefined, by: string): JobInfo {
    const entry = this.#entry(jobId, user);
    if (entry.info.state !== 'running' || !entry.child) return { ...entry.info };
    entry.info = { ...entry.info, state: 'stopping', reason: `stopped by ${by}` };
    this.#save(entry.info);
    const pid = entry.child.pid;
    if (pid !== undefined) {
      killGroup(pid, 'SIGTERM');
      entry.stopTimer = setTimeout(() => killGroup(pid, 'SIGKILL'), STOP_GRACE_MS);
      entry.stopTimer.unref();
    }
    return { ...entry.info };
  }

  logPath(jobId: string): string {
    return join(this.directory, `${jobId}.log`);
  }

  /** Stops every running job and waits for them to end (they are this broker's processes). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const live = [...this.#jobs.values()].filter((entry) => entry.child);
    for (const entry of live) this.stop(entry.info.jobId, undefined, 'the broker shutting down');
    await Promise.all(live.map((entry) => entry.ended));
  }

  #entry(jobId: unknown, user: string | undefined): JobEntry {
    const entry = typeof jobId === 'string' ? this.#jobs.get(jobId) : undefined;
    if (!entry || (user !== undefined && entry.info.user !== user)) throw new TrellisError('ERR_JOB_NOT_FOUND', `no job ${JSON.stringify(jobId)}${user ? ` of user ${user}` : ''} on this broker`);
    return entry;
  }

  /** The record, written whole or not at all (a temp file renamed). */
  #save(info: JobInfo): void {
    const path = join(this.directory, `${info.jobId}.json`);
    writeFileSync(`${path}.tmp`, JSON.stringify(info));
    renameSync(`${path}.tmp`, path);
  }
}

/** The end of a read that stops at a whole character (UTF-8 sequences are not cut). */
function trimmedEnd(buffer: Buffer, length: number, complete: boolean): number {
  if (complete) return length;
  let end = length;
  // Back over continuation bytes, then over the lead byte whose sequence they are part of.
  let back = 0;
  while (end - back > 0 && back < 3 && (buffer[end - back - 1] & 0xc0) === 0x80) back++;
  const lead = buffer[end - back - 1];
  if (lead !== undefined && lead >= 0xc0) {
    const size = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : 2;
    if (back + 1 < size) end -= back + 1;
  }
  return end;
}

function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    // Gone already.
  }
}

/** A job's name when none is given: its script's file name (the first argument that names one), else its command's. */
function defaultName(entrypoint: string[]): string {
  const script = entrypoint.slice(1).find((argument) => /\.(?:[cm]?[jt]s|py|sh)$/.test(argument)) ?? entrypoint[0];
  return script.split(/[\\/]/).pop() || entrypoint[0];
}

function checkSubmission(submission: JobSubmission, uploaded: boolean): { entrypoint: string[]; cwd: string; env: Record<string, string>; name?: string; runtimeEnv: RuntimeEnvironment } {
  if (typeof submission !== 'object' || submission === null) throw new InvalidArgumentError('a job is { entrypoint, cwd?, env?, name?, runtimeEnv? }');
  const { entrypoint, cwd, env, name, runtimeEnv } = submission;
  if (cwd !== undefined && uploaded) throw new InvalidArgumentError("a job runs in its working directory's copy on the broker's host or in a cwd there, not both", 'ERR_JOB_CWD');
  if (runtimeEnv?.workingDir !== undefined) throw new InvalidArgumentError("a job's runtimeEnv.workingDir travels as a package with the submission (submitJob packs it)", 'ERR_RUNTIME_ENV');
  // Its options about a working directory hold for the copy it came as.
  const checkedEnvironment = checkRuntimeEnvironment(runtimeEnv === undefined ? undefined : { ...runtimeEnv, ...(uploaded ? { workingDir: '/' } : {}) }, "a job's runtimeEnv");
  delete checkedEnvironment.workingDir;
  if (!Array.isArray(entrypoint) || entrypoint.length === 0 || entrypoint.some((part) => typeof part !== 'string') || entrypoint[0] === '') {
    throw new InvalidArgumentError("a job's entrypoint is its command and arguments, e.g. ['node', 'job.js']");
  }
  let directory = process.cwd();
  if (cwd !== undefined) {
    if (typeof cwd !== 'string' || !isAbsolute(cwd)) throw new InvalidArgumentError(`a job's cwd is an absolute directory on the broker's host, got ${JSON.stringify(cwd)}`);
    let isDirectory = false;
    try {
      isDirectory = statSync(cwd).isDirectory();
    } catch {
      isDirectory = false;
    }
    if (!isDirectory) throw new InvalidArgumentError(`a job's cwd '${cwd}' is not a directory on the broker's host`, 'ERR_JOB_CWD');
    directory = cwd;
  }
  if (env !== undefined && (typeof env !== 'object' || env === null || Object.values(env).some((value) => typeof value !== 'string'))) {
    throw new InvalidArgumentError("a job's env maps names to strings");
  }
  if (name !== undefined && (typeof name !== 'string' || name === '' || name.length > 200)) throw new InvalidArgumentError(`a job's name is a non-empty string of at most 200 characters, got ${JSON.stringify(name)}`);
  return { entrypoint: [...entrypoint], cwd: directory, env: { ...(env ?? {}) }, ...(name ? { name } : {}), runtimeEnv: checkedEnvironment };
}
