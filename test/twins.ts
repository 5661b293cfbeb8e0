/**
 * The suite's global setup: writes the compiled twins of the checkout's TypeScript outside the
 * library (tests, examples, benchmarks) that workers import instead of the sources, sparing each
 * worker the TypeScript loader (see compiledTwin in lib/core/worker-loader.ts). Only where the
 * library's build is fresh, as workers then run it; each module is compiled alone (the project
 * sets isolatedModules), and only when its twin is missing or older than it.
 */
import { mkdirSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync, readlinkSync } from 'node:fs';
import { basename, dirname, join, relative } from 'node:path';
import { pathToFileURL } from 'node:url';
import ts from 'typescript';
import { freshLibraryBuild, TWINS_FOLDER, TWINS_VARIABLE } from '../lib/core/worker-loader.js';

const FOLDERS = ['test', 'examples', 'bench'];
/** Changed whenever the twins' compiling changes. */
const FORMAT = '2: ES2022, inline source maps';

function* typeScriptModules(folder: string): Generator<string> {
  for (const entry of readdirSync(folder, { withFileTypes: true })) {
    const path = join(folder, entry.name);
    if (entry.isDirectory()) {
      if (entry.name !== 'node_modules' && !entry.name.startsWith('.')) yield* typeScriptModules(path);
    } else if (/\.[mc]?ts$/.test(entry.name) && !entry.name.endsWith('.d.ts')) {
      yield path;
    }
  }
}

/** Makes `link` a symbolic link to `target` (a relative path), replacing whatever is there. */
function linkTo(link: string, target: string): void {
  try {
    if (readlinkSync(link) === target) return;
  } catch {
    // Missing, or not a link.
  }
  rmSync(link, { recursive: true, force: true });
  symlinkSync(target, link, 'dir');
}

export function writeTwins(root: string): number {
  const twins = join(root, TWINS_FOLDER);
  // Twins written the way this file wrote them before a change to it are written again.
  const stamp = join(twins, 'format');
  let format = '';
  try {
    format = readFileSync(stamp, 'utf8');
  } catch {
    // None written yet.
  }
  if (format !== FORMAT) rmSync(twins, { recursive: true, force: true });
  mkdirSync(twins, { recursive: true });
  writeFileSync(stamp, FORMAT);
  // The twins' imports of the library (../lib/...) land on the build the workers run.
  linkTo(join(twins, 'lib'), relative(twins, join(root, 'dist')));
  const compilerOptions: ts.CompilerOptions = {
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.ESNext,
    isolatedModules: true,
    esModuleInterop: true,
    useDefineForClassFields: true,
  };
  let written = 0;
  for (const folder of FOLDERS) {
    for (const source of typeScriptModules(join(root, folder))) {
      const twin = join(twins, relative(root, source)).replace(/\.([mc]?)ts$/, '.$1js');
      const built = statSync(twin, { throwIfNoEntry: false });
      if (built && built.mtimeMs >= statSync(source).mtimeMs) continue;
      // Mapped to the source, so that stacks name the lines the user wrote (worker-loader.ts
      // turns Node.js's source maps on before a worker imports its first twin).
      const output = ts.transpileModule(readFileSync(source, 'utf8'), {
        compilerOptions: { ...compilerOptions, inlineSourceMap: true, sourceRoot: pathToFileURL(dirname(source)).href + '/' },
        fileName: basename(source),
      });
      mkdirSync(dirname(twin), { recursive: true });
      writeFileSync(twin, output.outputText);
      written++;
    }
  }
  return written;
}

export default function setup(): void {
  const build = freshLibraryBuild();
  if (!build) return;
  writeTwins(dirname(build.sources));
  // Inherited by the test processes, their workers and the scripts they start.
  process.env[TWINS_VARIABLE] = '1';
}
