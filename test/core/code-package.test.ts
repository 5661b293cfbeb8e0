/**
 * Working directories as packages (runtimeEnv): what is packed and what is left out, the same
 * files making the same id, the size limit's error, unpacking into a host's cache (with the
 * host's trellis and packages linked), damaged or hostile packages refused, and module names
 * that read the same on every host.
 */
import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readlinkSync, realpathSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { gzipSync } from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { CodeCache, checkRuntimeEnvironment, isIgnored, packWorkingDirectory, parseIgnoreRules } from '../../lib/core/code-package.js';
import { canonicalModule, localModule, mapWorkingDirectory } from '../../lib/core/code-location.js';
import { packageRoot } from '../../lib/native.js';
import { CodePackageError, InvalidArgumentError } from '../../lib/index.js';

const root = mkdtempSync(join(tmpdir(), 'trellis-code-test-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

let next = 0;
/** A directory made of `files` (path: text). */
function tree(files: Record<string, string>): string {
  const directory = join(root, `tree-${next++}`);
  for (const [path, text] of Object.entries(files)) {
    mkdirSync(dirname(join(directory, path)), { recursive: true });
    writeFileSync(join(directory, path), text);
  }
  return directory;
}

function rejection(promise: Promise<unknown>): Promise<Error> {
  return promise.then(() => { throw new Error('expected a rejection'); }, (error: Error) => error);
}

describe('ignore rules', () => {
  it('read .gitignore lines: globs, anchors, directories, negation', () => {
    const rules = parseIgnoreRules(['# a comment', '', '*.log', '!keep.log', '/build', 'cache/', 'docs/**/*.pdf', 'a?c'], 'test');
    const ignored = (path: string, directory = false) => isIgnored(rules, path, directory);
    expect(ignored('x.log')).toBe(true);
    expect(ignored('deep/x.log')).toBe(true);
    expect(ignored('keep.log')).toBe(false);
    expect(ignored('build', true)).toBe(true);
    expect(ignored('src/build', true)).toBe(false);
    expect(ignored('cache', true)).toBe(true);
    expect(ignored('src/cache', true)).toBe(true);
    expect(ignored('cache', false)).toBe(false);
    expect(ignored('docs/a.pdf')).toBe(true);
    expect(ignored('docs/x/y/a.pdf')).toBe(true);
    expect(ignored('a.pdf')).toBe(false);
    expect(ignored('abc')).toBe(true);
    expect(ignored('abbc')).toBe(false);
  });
});

describe('packing a working directory', () => {
  it('leaves out node_modules, .git, excludes and .trellisignore lines, and makes the same id from the same files', async () => {
    const directory = tree({
      'main.ts': 'export const x = 1;\n',
      'lib/util.ts': 'export const y = 2;\n',
      'data/big.bin': 'x'.repeat(1000),
      'notes.log': 'log\n',
      'keep.log': 'kept\n',
      'node_modules/left/index.js': 'nope',
      '.git/HEAD': 'ref',
      '.trellisignore': '# not sent\n*.log\n!keep.log\n',
    });
    const packed = await packWorkingDirectory({ workingDir: directory, excludes: ['data/'] });
    expect(packed.root).toBe(directory);
    expect(packed.rootUrl).toBe(`${pathToFileURL(directory).href}/`);
    expect(packed.code.files).toBe(4); // main.ts, lib/util.ts, keep.log, .trellisignore
    expect(packed.dependencies).toBeUndefined();
    const again = await packWorkingDirectory({ workingDir: directory, excludes: ['data/'] });
    expect(again.code.id).toBe(packed.code.id);
    writeFileSync(join(directory, 'main.ts'), 'export const x = 2;\n');
    const changed = await packWorkingDirectory({ workingDir: directory, excludes: ['data/'] });
    expect(changed.code.id).not.toBe(packed.code.id);
    // Without the exclude, the data is part of it.
    expect((await packWorkingDirectory({ workingDir: directory })).code.files).toBe(5);
  });

  it('refuses a directory over maxBytes, naming its largest parts', async () => {
    const directory = tree({ 'weights/a.bin': 'w'.repeat(3000), 'weights/b.bin': 'w'.repeat(3000), 'main.ts': 'x' });
    const error = await rejection(packWorkingDirectory({ workingDir: directory, maxBytes: 4096 }));
    expect(error).toBeInstanceOf(CodePackageError);
    expect((error as CodePackageError).code).toBe('ERR_WORKING_DIR_TOO_LARGE');
    expect(error.message).toMatch(/weights\/ 0\.0 MiB/);
    expect(error.message).toMatch(/excludes/);
  });

  it('checks runtimeEnv with typed errors', async () => {
    const bad = (value: unknown) => {
      try {
        checkRuntimeEnvironment(value);
      } catch (error) {
        expect(error).toBeInstanceOf(InvalidArgumentError);
        expect((error as InvalidArgumentError).code).toBe('ERR_RUNTIME_ENV');
        return (error as Error).message;
      }
      throw new Error('expected an error');
    };
    expect(bad({ workingdir: '.' })).toMatch(/no option 'workingdir'/);
    expect(bad({ excludes: ['x'] })).toMatch(/workingDir is not given/);
    expect(bad({ workingDir: '.', maxBytes: -1 })).toMatch(/maxBytes/);
    expect(bad({ env: { 'A-B': 'x' } })).toMatch(/'A-B' is not/);
    expect(bad({ env: { TRELLIS_X: 'x' } })).toMatch(/trellis's own/);
    expect(bad({ env: { A: 1 } })).toMatch(/env\.A is a string/);
    expect(checkRuntimeEnvironment({ workingDir: '.' }).workingDir).toBe(process.cwd());
    const missing = await rejection(packWorkingDirectory({ workingDir: join(root, 'absent') }));
    expect(missing.message).toMatch(/is not a directory/);
  });
});

describe('a host code cache', () => {
  it('installs a package with the host trellis and packages linked, once', async () => {
    const directory = tree({ 'main.ts': 'export {};\n', 'bin/run.sh': '#!/bin/sh\necho hi\n' });
    chmodSync(join(directory, 'bin/run.sh'), 0o755);
    const packed = await packWorkingDirectory({ workingDir: directory });
    const cache = new CodeCache(join(root, `cache-${next++}`));
    expect(await cache.installed(packed.code.id)).toBeUndefined();
    const path = await cache.install(packed.code.id, packed.code.bytes);
    expect(readFileSync(join(path, 'main.ts'), 'utf8')).toBe('export {};\n');
    expect(statSync(join(path, 'bin/run.sh')).mode & 0o111).not.toBe(0);
    expect(readlinkSync(join(path, 'node_modules/trellis'))).toBe(packageRoot);
    // The host's packages, as trellis itself found them.
    expect(realpathSync(join(path, 'node_modules/apache-arrow'))).toBe(realpathSync(join(packageRoot, 'node_modules/apache-arrow')));
    expect(await cache.installed(packed.code.id)).toBe(path);
    expect(await cache.install(packed.code.id, packed.code.bytes)).toBe(path);
  });

  it('sends dependencies as a package of their own, never trellis itself, and a job copy repacks to the same ids', async () => {
    const directory = tree({
      'main.ts': 'export {};\n',
      'node_modules/left-pad/package.json': '{"name":"left-pad","main":"index.js"}',
      'node_modules/left-pad/index.js': 'module.exports = (s) => s;\n',
      'node_modules/@scope/thing/index.js': 'module.exports = 1;\n',
      'node_modules/trellis/package.json': '{"name":"trellis"}',
    });
    mkdirSync(join(directory, 'node_modules/.bin'));
    symlinkSync('../left-pad/index.js', join(directory, 'node_modules/.bin/left-pad'));
    const packed = await packWorkingDirectory({ workingDir: directory, includeDependencies: true });
    expect(packed.dependencies?.files).toBe(3);
    const cache = new CodeCache(join(root, `cache-${next++}`));
    await cache.addDependencies(packed.dependencies!.id, packed.dependencies!.bytes);
    expect(await cache.hasDependencies(packed.dependencies!.id)).toBe(true);
    const path = await cache.install(packed.code.id, packed.code.bytes, packed.dependencies!.id);
    expect(readFileSync(join(path, 'node_modules/left-pad/index.js'), 'utf8')).toContain('module.exports');
    expect(existsSync(join(path, 'node_modules/@scope/thing/index.js'))).toBe(true);
    expect(readlinkSync(join(path, 'node_modules/trellis'))).toBe(packageRoot);
    // A driver started in the copy (a job's) sends on what it came with, not the host's packages.
    const repacked = await packWorkingDirectory({ workingDir: path, includeDependencies: true });
    expect(repacked.code.id).toBe(packed.code.id);
    expect(repacked.dependencies?.id).toBe(packed.dependencies!.id);
  });

  it('refuses damaged packages and files outside the directory', async () => {
    const cache = new CodeCache(join(root, `cache-${next++}`));
    const packed = await packWorkingDirectory({ workingDir: tree({ 'a.ts': 'x' }) });
    const damaged = Buffer.from(packed.code.bytes);
    const wrongId = await rejection(cache.install('0'.repeat(32), damaged));
    expect((wrongId as CodePackageError).code).toBe('ERR_CODE_PACKAGE');
    expect(wrongId.message).toMatch(/arrived damaged/);
    const notGzip = await rejection(cache.install(packed.code.id, Buffer.from('plain')));
    expect(notGzip.message).toMatch(/not gzip/);
    const payload = Buffer.concat([Buffer.from(`TRELLIS-CODE 1\n${JSON.stringify([['../escape.txt', 1, 0]])}\n`), Buffer.from('x')]);
    const id = createHash('sha256').update(payload).digest('hex').slice(0, 32);
    const hostile = await rejection(cache.install(id, gzipSync(payload)));
    expect(hostile.message).toMatch(/outside its directory/);
    const garbled = Buffer.from('TRELLIS-CODE 1\nnot a list\nxyz');
    const garbledId = createHash('sha256').update(garbled).digest('hex').slice(0, 32);
    expect((await rejection(cache.install(garbledId, gzipSync(garbled)))).message).toMatch(/header that names no files/);
    expect(existsSync(join(cache.directory, '..', 'escape.txt'))).toBe(false);
  });
});

describe('module names across hosts', () => {
  it("name trellis's modules by their place in the library and map a working directory's copy", () => {
    // The library's sources, or its build where the suite runs that (vitest.config.ts).
    const library = localModule('trellis:data/worker-tasks');
    expect(library).toMatch(/\/(lib\/data\/worker-tasks\.ts|dist\/data\/worker-tasks\.js)$/);
    expect(existsSync(fileURLToPath(library))).toBe(true);
    expect(canonicalModule(library)).toBe('trellis:data/worker-tasks');
    expect(canonicalModule('file:///elsewhere/x.ts')).toBe('file:///elsewhere/x.ts');
    mapWorkingDirectory('file:///home/user/project', 'file:///cache/abc-host');
    expect(localModule('file:///home/user/project/src/main.ts')).toBe('file:///cache/abc-host/src/main.ts');
    expect(canonicalModule('file:///cache/abc-host/src/main.ts')).toBe('file:///home/user/project/src/main.ts');
    expect(localModule('file:///home/user/other.ts')).toBe('file:///home/user/other.ts');
    mapWorkingDirectory();
    expect(localModule('file:///home/user/project/src/main.ts')).toBe('file:///home/user/project/src/main.ts');
  });
});
