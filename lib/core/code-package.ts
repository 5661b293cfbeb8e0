/**
 * Working directories shipped to hosts, as Ray's runtime_env working_dir: a driver names a
 * directory, and every worker, on any host, runs with a copy of it as its working directory and
 * imports the driver's modules from there. Hosts then need trellis installed, not the user's code.
 *
 * A directory travels as a package: its files in a fixed order, without times or owners, gzipped;
 * its id is the SHA-256 of what was packed, so the same files make the same id on every run and a
 * host that unpacked it once (in its code cache) is not sent it again. A working directory's
 * node_modules is never part of its code: either each host links the packages it has installed
 * (the default, as a Python cluster's image holds its libraries), or, with `includeDependencies`,
 * it travels as a second package of its own, which changes far less often than the code and so is
 * sent far less often. The trellis package itself always comes from the host: a worker's runtime
 * and the user's `import 'trellis'` must be the same module, built for that host.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { gunzip, gzip } from 'node:zlib';
import { CodePackageError, InvalidArgumentError } from '../errors.js';
import { packageRoot } from '../native.js';
import { checkEnvironmentVariables } from './options.js';

/** What every worker of a driver runs with (init's `runtimeEnv`). */
export interface RuntimeEnvironment {
  /**
   * A directory sent to every host: workers run in their host's copy of it and import the
   * driver's modules from there. Default: the job's, for a driver submitted with a working directory.
   */
  workingDir?: string;
  /**
   * Files left out, as .gitignore lines: `*.log`, `data/`, `/build`, `!keep.log`. Added to those
   * of a `.trellisignore` file at the directory's top; `.git/` and `node_modules/` are never part
   * of the code.
   */
  excludes?: string[];
  /**
   * Send the working directory's node_modules too (as a package of its own, which hosts keep),
   * instead of using the packages installed on each host (default false). trellis itself always
   * comes from the host.
   */
  includeDependencies?: boolean;
  /** The most bytes of files either package may hold (default 512 MiB). */
  maxBytes?: number;
  /** Environment variables of every worker, on every host. */
  env?: Record<string, string>;
}

/** One packed directory. */
export interface CodeLayer {
  /** The SHA-256 of what was packed (hex, 32 characters). */
  id: string;
  /** The package: gzipped. */
  bytes: Uint8Array;
  files: number;
  /** Bytes of files it holds, before compression. */
  size: number;
}

/** A working directory as the driver ships it. */
export interface PackedWorkingDirectory {
  /** Its absolute path on the driver's host. */
  root: string;
  /** Its file URL, ending in '/': the name its modules go by on every host. */
  rootUrl: string;
  code: CodeLayer;
  dependencies?: CodeLayer;
}

const DEFAULT_MAX_BYTES = 512 * 1024 * 1024;
const MAGIC = 'TRELLIS-CODE 1\n';
/** Written into an install: which dependencies package its node_modules links. */
const INSTALL_RECORD = '.trellis-install.json';
/** Never part of a working directory's code. */
const ALWAYS_EXCLUDED = ['.git/', 'node_modules/', `/${INSTALL_RECORD}`];
/** Never part of its dependencies: the host's trellis is used, and bin links are the host's. */
const DEPENDENCIES_EXCLUDED = ['/trellis/', '/.bin/'];
/** Cache entries not used for this long are removed when another is made. */
const CACHE_KEEP_MS = 7 * 24 * 3600_000;

const gzipAsync = promisify(gzip);
const gunzipAsync = promisify(gunzip);

// ---------------------------------------------------------------------------------------------
// Patterns (a subset of .gitignore's: globs, anchors, directories only, negation)

interface IgnoreRule {
  pattern: RegExp;
  negate: boolean;
  directoryOnly: boolean;
}

function globToSource(glob: string): string {
  let source = '';
  for (let i = 0; i < glob.length; i++) {
    const char = glob[i];
    if (char === '*') {
      if (glob[i + 1] === '*') {
        // '**/' any directories (none too); a final '**' everything below.
        if (glob[i + 2] === '/') {
          source += '(?:.*/)?';
          i += 2;
        } else {
          source += '.*';
          i += 1;
        }
      } else source += '[^/]*';
    } else if (char === '?') source += '[^/]';
    else if (char === '[') {
      const end = glob.indexOf(']', i + 1);
      if (end < 0) source += '\\[';
      else {
        const body = glob.slice(i + 1, end).replace(/^!/, '^').replace(/\\/g, '\\\\');
        source += `[${body}]`;
        i = end;
      }
    } else if (char === '\\' && i + 1 < glob.length) {
      source += glob[++i].replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
    } else source += char.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
  }
  return source;
}

/** Parses .gitignore lines; `from` names where they came from, for errors. */
export function parseIgnoreRules(lines: readonly string[], from: string): IgnoreRule[] {
  const rules: IgnoreRule[] = [];
  for (const raw of lines) {
    if (typeof raw !== 'string') throw new InvalidArgumentError(`${from}: an exclude pattern is a string, got ${typeof raw}`, 'ERR_RUNTIME_ENV');
    let line = raw.replace(/\r$/, '');
    if (!/\\\s$/.test(line)) line = line.replace(/\s+$/, '');
    if (line === '' || line.startsWith('#')) continue;
    const negate = line.startsWith('!');
    if (negate) line = line.slice(1);
    const directoryOnly = line.endsWith('/');
    if (directoryOnly) line = line.slice(0, -1);
    if (line === '') continue;
    // With a slash before its end, a pattern is anchored at the top; without, it matches at any depth.
    const anchored = line.includes('/');
    if (line.startsWith('/')) line = line.slice(1);
    const source = (anchored ? '^' : '^(?:.*/)?') + globToSource(line) + '$';
    let pattern: RegExp;
    try {
      pattern = new RegExp(source);
    } catch {
      throw new InvalidArgumentError(`${from}: cannot read the exclude pattern ${JSON.stringify(raw)}`, 'ERR_RUNTIME_ENV');
    }
    rules.push({ pattern, negate, directoryOnly });
  }
  return rules;
}

/** Whether a path (relative, '/'-separated) is left out: the last rule that matches decides. */
export function isIgnored(rules: readonly IgnoreRule[], path: string, directory: boolean): boolean {
  let ignored = false;
  for (const rule of rules) {
    if (rule.directoryOnly && !directory) continue;
    if (rule.pattern.test(path)) ignored = !rule.negate;
  }
  return ignored;
}

// ---------------------------------------------------------------------------------------------
// Packing

interface PackedFile {
  path: string;
  size: number;
  executable: boolean;
  absolute: string;
}

/** The files of `root` not ignored, sorted, following links (a link's target is packed as a file). */
async function listFiles(root: string, rules: readonly IgnoreRule[], maxBytes: number, what: string): Promise<PackedFile[]> {
  const files: PackedFile[] = [];
  let total = 0;
  const seen = new Set<string>();
  const visit = async (directory: string, prefix: string): Promise<void> => {
    const real = await fs.realpath(directory);
    // A link back up the tree would be packed for ever.
    if (seen.has(real)) return;
    seen.add(real);
    const entries = (await fs.readdir(directory)).sort();
    for (const name of entries) {
      const path = prefix + name;
      const absolute = join(directory, name);
      let stat;
      try {
        stat = await fs.stat(absolute);
      } catch {
        continue; // a dangling link: nothing to send
      }
      if (stat.isDirectory()) {
        if (!isIgnored(rules, path, true)) await visit(absolute, `${path}/`);
      } else if (stat.isFile() && !isIgnored(rules, path, false)) {
        files.push({ path, size: stat.size, executable: (stat.mode & 0o111) !== 0, absolute });
        total += stat.size;
      }
    }
    seen.delete(real);
  };
  await visit(root, '');
  if (total > maxBytes) throw tooLarge(files, total, maxBytes, what);
  return files;
}

function tooLarge(files: readonly PackedFile[], total: number, maxBytes: number, what: string): CodePackageError {
  const byTop = new Map<string, number>();
  for (const file of files) {
    const top = file.path.includes('/') ? `${file.path.slice(0, file.path.indexOf('/'))}/` : file.path;
    byTop.set(top, (byTop.get(top) ?? 0) + file.size);
  }
  const largest = [...byTop].sort((a, b) => b[1] - a[1]).slice(0, 5).map(([path, size]) => `${path} ${mebibytes(size)}`);
  return new CodePackageError(
    'ERR_WORKING_DIR_TOO_LARGE',
    `${what} holds ${mebibytes(total)} of files, more than runtimeEnv.maxBytes (${mebibytes(maxBytes)}); the largest: ${largest.join(', ')}. Leave files out with runtimeEnv.excludes or a .trellisignore file`,
  );
}

function mebibytes(bytes: number): string {
  return `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

/** A package's id: the SHA-256 of what was packed (hex, 32 characters). */
function packageId(payload: Uint8Array): string {
  return createHash('sha256').update(payload).digest('hex').slice(0, 32);
}

/** Packs a directory's files (not those `rules` leave out) into one layer. */
export async function packDirectory(root: string, rules: readonly IgnoreRule[], maxBytes: number, what: string): Promise<CodeLayer> {
  const files = await listFiles(root, rules, maxBytes, what);
  const header = Buffer.from(`${MAGIC}${JSON.stringify(files.map((file) => [file.path, file.size, file.executable ? 1 : 0]))}\n`);
  const parts: Buffer[] = [header];
  for (const file of files) {
    const bytes = await fs.readFile(file.absolute);
    // A file that changed while it was packed would not match its header.
    if (bytes.length !== file.size) throw new CodePackageError('ERR_WORKING_DIR_CHANGED', `${what}: ${file.path} changed while it was packed; try again`);
    parts.push(bytes);
  }
  const payload = Buffer.concat(parts);
  const id = packageId(payload);
  // Level 1: most of what gzip saves on source text, at a fraction of its time.
  const bytes = await gzipAsync(payload, { level: 1 });
  return { id, bytes: new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength), files: files.length, size: payload.length - header.length };
}

/** What a working directory's packages hold together: files, and bytes before compression. */
export function packageTotals(code: { files: number; size: number }, dependencies?: { files: number; size: number }): { files: number; bytes: number } {
  return { files: code.files + (dependencies?.files ?? 0), bytes: code.size + (dependencies?.size ?? 0) };
}

/** Checks a runtime environment's shape; the working directory made absolute. */
export function checkRuntimeEnvironment(value: unknown, where = 'runtimeEnv'): RuntimeEnvironment {
  if (value === undefined) return {};
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new InvalidArgumentError(`${where} is { workingDir?, excludes?, includeDependencies?, maxBytes?, env? }`, 'ERR_RUNTIME_ENV');
  const { workingDir, excludes, includeDependencies, maxBytes, env, ...rest } = value as RuntimeEnvironment;
  const unknown = Object.keys(rest);
  if (unknown.length > 0) throw new InvalidArgumentError(`${where} has no option ${unknown.map((key) => `'${key}'`).join(', ')} (it takes workingDir, excludes, includeDependencies, maxBytes, env)`, 'ERR_RUNTIME_ENV');
  if (workingDir !== undefined && (typeof workingDir !== 'string' || workingDir === '')) throw new InvalidArgumentError(`${where}.workingDir is a directory's path, got ${JSON.stringify(workingDir)}`, 'ERR_RUNTIME_ENV');
  if (excludes !== undefined && (!Array.isArray(excludes) || excludes.some((pattern) => typeof pattern !== 'string'))) throw new InvalidArgumentError(`${where}.excludes is a list of .gitignore-style patterns`, 'ERR_RUNTIME_ENV');
  if ((excludes !== undefined || includeDependencies !== undefined || maxBytes !== undefined) && workingDir === undefined) {
    throw new InvalidArgumentError(`${where}: excludes, includeDependencies and maxBytes describe a working directory, and workingDir is not given`, 'ERR_RUNTIME_ENV');
  }
  if (includeDependencies !== undefined && typeof includeDependencies !== 'boolean') throw new InvalidArgumentError(`${where}.includeDependencies is true or false`, 'ERR_RUNTIME_ENV');
  if (maxBytes !== undefined && !(Number.isSafeInteger(maxBytes) && maxBytes > 0)) throw new InvalidArgumentError(`${where}.maxBytes is a positive whole number of bytes, got ${String(maxBytes)}`, 'ERR_RUNTIME_ENV');
  const checkedEnv = env === undefined ? undefined : checkEnvironmentVariables(env, `${where}.env`);
  return {
    ...(workingDir !== undefined ? { workingDir: resolve(workingDir) } : {}),
    ...(excludes ? { excludes: [...excludes] } : {}),
    ...(includeDependencies !== undefined ? { includeDependencies } : {}),
    ...(maxBytes !== undefined ? { maxBytes } : {}),
    ...(checkedEnv ? { env: checkedEnv } : {}),
  };
}

/**
 * The working directory a job was submitted with (jobs.ts sets TRELLIS_RUNTIME_ENV for its
 * driver): undefined for a driver that is no such job.
 */
export function jobRuntimeEnvironment(): RuntimeEnvironment | undefined {
  const text = process.env.TRELLIS_RUNTIME_ENV;
  if (!text) return undefined;
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new InvalidArgumentError(`TRELLIS_RUNTIME_ENV is not JSON: ${text.slice(0, 80)}`, 'ERR_RUNTIME_ENV');
  }
  return checkRuntimeEnvironment(value, 'TRELLIS_RUNTIME_ENV');
}

/**
 * Packs a runtime environment's working directory: its code, and its node_modules where
 * `includeDependencies` asks. Typed errors name a directory that is not one, a pattern that
 * cannot be read, and a package over `maxBytes` (with its largest parts).
 */
export async function packWorkingDirectory(environment: RuntimeEnvironment): Promise<PackedWorkingDirectory> {
  const root = resolve(environment.workingDir!);
  let isDirectory = false;
  try {
    isDirectory = (await fs.stat(root)).isDirectory();
  } catch {
    // Reported below.
  }
  if (!isDirectory) throw new InvalidArgumentError(`runtimeEnv.workingDir '${root}' is not a directory`, 'ERR_RUNTIME_ENV');
  let ignoreFile: string[] = [];
  try {
    ignoreFile = (await fs.readFile(join(root, '.trellisignore'), 'utf8')).split('\n');
  } catch {
    // None.
  }
  const maxBytes = environment.maxBytes ?? DEFAULT_MAX_BYTES;
  const rules = [
    ...parseIgnoreRules(ignoreFile, join(root, '.trellisignore')),
    ...parseIgnoreRules(environment.excludes ?? [], 'runtimeEnv.excludes'),
    ...parseIgnoreRules(ALWAYS_EXCLUDED, 'trellis'),
  ];
  const code = await packDirectory(root, rules, maxBytes, `the working directory ${root}`);
  let dependencies: CodeLayer | undefined;
  // An install (a job's copy on the broker's host) sends on the dependencies it came with, not the
  // host's packages its node_modules links too.
  const record = await fs.readFile(join(root, INSTALL_RECORD), 'utf8').then((text) => JSON.parse(text) as { dependencies?: string }, () => undefined);
  const modules = record ? (record.dependencies ?? join(root, 'no-dependencies')) : join(root, 'node_modules');
  if (environment.includeDependencies && (await fs.stat(modules).catch(() => undefined))?.isDirectory()) {
    dependencies = await packDirectory(modules, parseIgnoreRules(DEPENDENCIES_EXCLUDED, 'trellis'), maxBytes, `the working directory's dependencies ${modules}`);
    if (dependencies.files === 0) dependencies = undefined;
  }
  return { root, rootUrl: `${pathToFileURL(root).href.replace(/\/$/, '')}/`, code, ...(dependencies ? { dependencies } : {}) };
}

// ---------------------------------------------------------------------------------------------
// Unpacking, on the hosts

/** The directory a host keeps unpacked packages in (TRELLIS_CODE_CACHE, else the temp directory's). */
export function defaultCodeCache(): string {
  return process.env.TRELLIS_CODE_CACHE || join(tmpdir(), 'trellis-code');
}

/**
 * Where a working directory is installed: its code, with its dependencies or the host's (named
 * by where this host's trellis is, as its node_modules links there).
 */
export function installName(code: string, dependencies?: string): string {
  return `${code}-${dependencies ?? `host${createHash('sha256').update(packageRoot).digest('hex').slice(0, 8)}`}`;
}

/** Unpacks a package's files into `directory` (which must not exist), checking its id. */
async function unpackInto(bytes: Uint8Array, id: string, directory: string): Promise<void> {
  let payload: Buffer;
  try {
    payload = await gunzipAsync(bytes);
  } catch (error) {
    throw new CodePackageError('ERR_CODE_PACKAGE', `package ${id} is not gzip data: ${(error as Error).message}`);
  }
  const digest = packageId(payload);
  if (digest !== id) throw new CodePackageError('ERR_CODE_PACKAGE', `package ${id} arrived damaged (its bytes hash to ${digest})`);
  const headerEnd = payload.indexOf(10, MAGIC.length);
  if (payload.subarray(0, MAGIC.length).toString() !== MAGIC || headerEnd < 0) throw new CodePackageError('ERR_CODE_PACKAGE', `package ${id} is not a trellis code package`);
  let entries: Array<[string, number, number]>;
  try {
    entries = JSON.parse(payload.subarray(MAGIC.length, headerEnd).toString()) as Array<[string, number, number]>;
  } catch {
    entries = [];
  }
  const wellFormed = Array.isArray(entries) && entries.every((entry) => Array.isArray(entry) && typeof entry[0] === 'string' && Number.isSafeInteger(entry[1]) && entry[1] >= 0);
  if (!wellFormed || (entries.length === 0 && headerEnd + 1 !== payload.length)) throw new CodePackageError('ERR_CODE_PACKAGE', `package ${id} has a header that names no files`);
  let offset = headerEnd + 1;
  await fs.mkdir(directory, { recursive: true });
  const made = new Set<string>([directory]);
  for (const [path, size, executable] of entries) {
    const target = resolve(directory, path);
    // A package names files inside its directory only.
    if (path.startsWith('/') || path.split('/').includes('..') || !target.startsWith(directory + sep)) {
      throw new CodePackageError('ERR_CODE_PACKAGE', `package ${id} names a file outside its directory: ${JSON.stringify(path)}`);
    }
    const parent = dirname(target);
    if (!made.has(parent)) {
      await fs.mkdir(parent, { recursive: true });
      made.add(parent);
    }
    await fs.writeFile(target, payload.subarray(offset, offset + size), { mode: executable ? 0o755 : 0o644 });
    offset += size;
  }
  if (offset !== payload.length) throw new CodePackageError('ERR_CODE_PACKAGE', `package ${id} holds ${payload.length - offset} bytes its header does not name`);
}

/** Moves a finished directory into place; another process that made the same one first wins. */
async function settle(temporary: string, final: string): Promise<void> {
  try {
    await fs.rename(temporary, final);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== 'EEXIST' && code !== 'ENOTEMPTY') throw error;
    await fs.rm(temporary, { recursive: true, force: true });
  }
}

async function exists(path: string): Promise<boolean> {
  return fs.access(path).then(() => true, () => false);
}

/** The host's installed packages: where trellis's own dependencies were installed. */
function hostModules(): string {
  const parent = dirname(packageRoot);
  if (basename(parent) === 'node_modules') return parent;
  if (basename(parent).startsWith('@') && basename(dirname(parent)) === 'node_modules') return dirname(parent);
  return join(packageRoot, 'node_modules');
}

/** Links every package of `from` not in `into` yet (scopes merged), so imports there find them. */
async function linkPackages(from: string, into: string): Promise<void> {
  // None there: nothing to link.
  const names = await fs.readdir(from).catch((): string[] => []);
  for (const name of names) {
    if (name === '.bin' || name.startsWith('.')) continue;
    const source = join(from, name);
    const target = join(into, name);
    const present = await fs.lstat(target).catch(() => undefined);
    if (name.startsWith('@') && (await fs.stat(source).catch(() => undefined))?.isDirectory()) {
      if (present && !present.isSymbolicLink()) {
        await linkPackages(source, target);
        continue;
      }
      if (present) continue;
    }
    if (!present) await fs.symlink(source, target, 'dir');
  }
}

/**
 * A host's cache of unpacked working directories. Each install is made in a directory of its
 * own and renamed into place, so agents of several drivers on one host share it safely; entries
 * unused for a week go when a new one is made.
 */
export class CodeCache {
  constructor(readonly directory: string = defaultCodeCache()) {}

  /** Where an install is, if this host has it (and marks it used). */
  async installed(code: string, dependencies?: string): Promise<string | undefined> {
    const path = join(this.directory, installName(code, dependencies));
    if (!(await exists(path))) return undefined;
    const now = new Date();
    await fs.utimes(path, now, now).catch(() => undefined);
    if (dependencies) await fs.utimes(join(this.directory, 'dependencies', dependencies), now, now).catch(() => undefined);
    return path;
  }

  /** Whether a dependencies package is unpacked here. */
  async hasDependencies(id: string): Promise<boolean> {
    return exists(join(this.directory, 'dependencies', id));
  }

  /** Unpacks a dependencies package (a directory of packages, as node_modules). */
  async addDependencies(id: string, bytes: Uint8Array): Promise<void> {
    const final = join(this.directory, 'dependencies', id);
    if (await exists(final)) return;
    const temporary = `${final}.${process.pid}-${randomBytes(4).toString('hex')}`;
    try {
      await unpackInto(bytes, id, temporary);
      await settle(temporary, final);
    } catch (error) {
      await fs.rm(temporary, { recursive: true, force: true });
      throw error;
    }
  }

  /**
   * Installs a working directory unless this host has it, adding its dependencies package first
   * where that is missing; a package's bytes are asked for only when they are needed. Returns its path.
   */
  async ensure(code: { id: string; bytes: () => Uint8Array }, dependencies?: { id: string; bytes: () => Uint8Array }): Promise<string> {
    if (dependencies && !(await this.hasDependencies(dependencies.id))) await this.addDependencies(dependencies.id, dependencies.bytes());
    return (await this.installed(code.id, dependencies?.id)) ?? (await this.install(code.id, code.bytes(), dependencies?.id));
  }

  /**
   * Installs a working directory: the code unpacked, and a node_modules beside it linking the
   * dependencies package's packages (when there is one; it must be here already), then the
   * host's, with `trellis` always the host's own. Returns its path.
   */
  async install(code: string, bytes: Uint8Array, dependencies?: string): Promise<string> {
    const existing = await this.installed(code, dependencies);
    if (existing) return existing;
    if (dependencies && !(await this.hasDependencies(dependencies))) throw new CodePackageError('ERR_CODE_PACKAGE', `dependencies package ${dependencies} is not on this host`);
    await fs.mkdir(this.directory, { recursive: true });
    await this.#prune();
    const final = join(this.directory, installName(code, dependencies));
    const temporary = `${final}.${process.pid}-${randomBytes(4).toString('hex')}`;
    try {
      await unpackInto(bytes, code, temporary);
      const modules = join(temporary, 'node_modules');
      await fs.mkdir(modules, { recursive: true });
      await fs.symlink(packageRoot, join(modules, 'trellis'), 'dir');
      if (dependencies) await linkPackages(join(this.directory, 'dependencies', dependencies), modules);
      await linkPackages(hostModules(), modules);
      const record = dependencies ? { dependencies: join(this.directory, 'dependencies', dependencies) } : {};
      await fs.writeFile(join(temporary, INSTALL_RECORD), JSON.stringify(record));
      await settle(temporary, final);
    } catch (error) {
      await fs.rm(temporary, { recursive: true, force: true });
      throw error;
    }
    return final;
  }

  /** Removes installs and dependencies unused for a week (and what a crash left half made). */
  async #prune(): Promise<void> {
    const cutoff = Date.now() - CACHE_KEEP_MS;
    for (const directory of [this.directory, join(this.directory, 'dependencies')]) {
      const names = await fs.readdir(directory).catch((): string[] => []);
      for (const name of names) {
        if (name === 'dependencies') continue;
        const path = join(directory, name);
        const stat = await fs.stat(path).catch(() => undefined);
        if (stat && stat.mtimeMs < cutoff) await fs.rm(path, { recursive: true, force: true }).catch(() => undefined);
      }
    }
  }
}
