/**
 * The second half of `npm run build`: turns the compiler's modules (build/library, one per source
 * file) into what dist/ ships, so that a process loads trellis as a few files instead of ~150.
 *
 * Node.js 20 spends most of a worker's start-up in its ES module loader, per module (resolve,
 * read, compile, link): trellis's own modules cost a process about 0.2 s of CPU, and every worker,
 * node agent and driver pays it. So the library's modules are bundled into a few chunks under
 * dist/bundle/, and each module keeps its place in dist/ as a facade that re-exports its names from
 * the bundle. Anything that imports a module by its path (a user's `trellis`, a worker's
 * `dist/core/worker-main.js`, a test's `dist/core/serialization.js`, a module a worker imports
 * again by the URL `remote(import.meta, fn)` recorded) reaches the one copy in the bundle.
 *
 * `import.meta` inside the bundle is each module's own: the bundler replaces it with an object
 * made from the module's original path (dist/bundle/module-meta.js), so `remote(import.meta, fn)`,
 * paths found beside a module and the library's root stay what they were. Dependencies
 * (apache-arrow, msgpackr...) stay external: users pass arrow tables in, and must share them.
 *
 * Run: node --import tsx scripts/bundle-library.ts (after tsc -p tsconfig.build.json)
 */
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build, type Metafile, type Plugin } from 'esbuild';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
/** The compiler's output (tsconfig.build.json's outDir); dist/ receives its declarations. */
const compiled = join(root, 'build', 'library');
const dist = join(root, 'dist');
const bundleFolder = join(dist, 'bundle');

/** Loaded apart from the rest: module hooks that run on Node.js's hooks thread, importing nothing. */
const COPIED = new Set(['core/library-build-hooks.js']);
/** Programs, not modules: they run when loaded, so they are bundle entries of their own, never re-exported. */
const PROGRAMS = new Map([
  ['core/worker-main.js', ''],
  ['cli/trellis.js', '#!/usr/bin/env node\n'],
]);
/**
 * Modules that are entries of their own besides the library's: a worker that runs a
 * library-internal actor imports only its class's module (see worker-main.ts), and through an
 * entry of its own that is just what the module needs, not the whole library behind the public
 * API (the data layer and apache-arrow, serving). Outputs at dist/bundle/<name>.js.
 */
const LIGHT_ENTRIES = new Map([
  ['llm/shard-worker.js', 'shard-worker'],
]);
/** The module the public API is; the bundle evaluates it (and what it imports) first, as Node.js would. */
const INDEX = 'index.js';

function* filesUnder(folder: string, pattern = /\.js$/): Generator<string> {
  for (const entry of readdirSync(folder, { withFileTypes: true })) {
    const path = join(folder, entry.name);
    if (entry.isDirectory()) yield* filesUnder(path, pattern);
    else if (pattern.test(entry.name)) yield path;
  }
}

const posix = (path: string) => path.split(sep).join('/');

/** Each module's export names (after `export *`), read off a throwaway build of every module as an entry. */
async function exportsOf(modules: string[]): Promise<Map<string, string[]>> {
  const result = await build({
    entryPoints: modules.map((module) => join(compiled, module)),
    outbase: compiled,
    outdir: join(root, 'build', 'library-exports'),
    bundle: true,
    splitting: true,
    format: 'esm',
    platform: 'node',
    packages: 'external',
    write: false,
    metafile: true,
    logLevel: 'silent',
  });
  const names = new Map<string, string[]>();
  for (const output of Object.values((result.metafile as Metafile).outputs)) {
    if (!output.entryPoint) continue;
    names.set(posix(relative(compiled, join(root, output.entryPoint))), output.exports);
  }
  return names;
}

/** A name for export `name` of module number `index`, unique across the bundle's entry. */
const alias = (index: number, name: string) => `m${index}$${name}`;

/**
 * Gives each module that reads `import.meta` one of its own, made from its original path relative
 * to dist/bundle/ by module-meta.js (which stays beside the chunks, unbundled, so that its own
 * import.meta is real).
 */
const moduleMetaPlugin: Plugin = {
  name: 'trellis-module-meta',
  setup(builder) {
    builder.onResolve({ filter: /^trellis:module-meta$/ }, () => ({ path: './module-meta.js', external: true }));
    builder.onLoad({ filter: /\.js$/ }, (args) => {
      if (!args.path.startsWith(compiled + sep)) return undefined;
      const text = readFileSync(args.path, 'utf8');
      if (!text.includes('import.meta')) return undefined;
      const original = `../${posix(relative(compiled, args.path))}`;
      // On the first line, so that every other line keeps its number in the module's source map.
      const preamble = `import { moduleMeta as __trellisModuleMeta } from "trellis:module-meta"; const __trellisMeta = __trellisModuleMeta(${JSON.stringify(original)}); `;
      return { contents: preamble + text, loader: 'js', resolveDir: dirname(args.path) };
    });
  },
};

const MODULE_META = `// Written by scripts/bundle-library.ts: the import.meta of a module bundled beside this file.
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

export function moduleMeta(path) {
  const url = new URL(path, import.meta.url).href;
  const filename = fileURLToPath(url);
  return { url, filename, dirname: dirname(filename), resolve: (specifier) => import.meta.resolve(specifier) };
}
`;

async function main(): Promise<void> {
  if (!existsSync(join(compiled, INDEX))) throw new Error(`${compiled} holds no ${INDEX}: run tsc -p tsconfig.build.json first`);
  const all = [...filesUnder(compiled)].map((path) => posix(relative(compiled, path))).sort();
  const library = [INDEX, ...all.filter((module) => module !== INDEX && !COPIED.has(module) && !PROGRAMS.has(module))];
  const names = await exportsOf(library);

  // The bundle's entry: every module's exports under names of their own. Nothing needs them all,
  // but a module left out would get a copy of its own in whichever chunk imported it.
  const entry = library
    .map((module, index) => {
      const exported = names.get(module) ?? [];
      return exported.length
        ? `export { ${exported.map((name) => `${name === 'default' ? 'default' : name} as ${alias(index, name)}`).join(', ')} } from './${module}';`
        : `import './${module}';`;
    })
    .join('\n');

  rmSync(bundleFolder, { recursive: true, force: true });
  const result = await build({
    entryPoints: [
      { in: 'trellis:library', out: 'library' },
      ...[...PROGRAMS.keys()].map((program) => ({ in: join(compiled, program), out: program.replace(/\.js$/, '') })),
      ...[...LIGHT_ENTRIES].map(([module, out]) => ({ in: join(compiled, module), out })),
    ],
    outdir: bundleFolder,
    outbase: compiled,
    chunkNames: 'chunk-[hash]',
    bundle: true,
    splitting: true,
    format: 'esm',
    platform: 'node',
    target: 'node20',
    packages: 'external',
    // Class and function names are how workers find what remote() registered, and errors' names.
    keepNames: true,
    define: { 'import.meta': '__trellisMeta' },
    sourcemap: 'linked',
    sourcesContent: false,
    metafile: true,
    logLevel: 'warning',
    // Dynamic imports of the user's modules name no file the bundler could read.
    logOverride: { 'unsupported-dynamic-import': 'silent' },
    plugins: [
      {
        name: 'trellis-library-entry',
        setup(builder) {
          builder.onResolve({ filter: /^trellis:library$/ }, () => ({ path: 'library', namespace: 'trellis-library' }));
          builder.onLoad({ filter: /.*/, namespace: 'trellis-library' }, () => ({ contents: entry, loader: 'js', resolveDir: compiled }));
        },
      },
      moduleMetaPlugin,
    ],
  });
  writeFileSync(join(bundleFolder, 'module-meta.js'), MODULE_META);

  // A module's meta path is relative to dist/bundle/: only files there may hold one.
  for (const [output, details] of Object.entries((result.metafile as Metafile).outputs)) {
    const folder = dirname(join(root, output));
    if (folder === bundleFolder || !output.endsWith('.js')) continue;
    if (details.imports.some((imported) => imported.path.endsWith('module-meta.js'))) {
      throw new Error(`${output} reads import.meta but lies outside ${bundleFolder}: its modules' paths would be wrong`);
    }
  }

  // dist/: facades in place of the modules, beside the declarations the compiler wrote there.
  // The compiler's modules and maps of an earlier build (dist/ held them before), or of a module since removed.
  for (const stale of filesUnder(dist, /\.js(\.map)?$/)) {
    if (!stale.startsWith(bundleFolder + sep)) rmSync(stale);
  }
  library.forEach((module, index) => {
    const target = join(dist, module);
    const light = LIGHT_ENTRIES.get(module);
    const fromHere = posix(relative(dirname(target), join(bundleFolder, light ? `${light}.js` : 'library.js')));
    const from = fromHere.startsWith('.') ? fromHere : `./${fromHere}`;
    const exported = names.get(module) ?? [];
    mkdirSync(dirname(target), { recursive: true });
    // A light entry exports the module's names as they are; the library's entry under aliases.
    writeFileSync(
      target,
      exported.length
        ? `export { ${exported.map((name) => (light ? name : `${alias(index, name)} as ${name}`)).join(', ')} } from '${from}';\n`
        : `import '${from}';\n`,
    );
  });
  for (const [program, header] of PROGRAMS) {
    const target = join(dist, program);
    const bundled = posix(relative(dirname(target), join(bundleFolder, program)));
    mkdirSync(dirname(target), { recursive: true });
    writeFileSync(target, `${header}import '${bundled.startsWith('.') ? bundled : `./${bundled}`}';\n`);
    if (header) chmodSync(target, 0o755);
  }
  for (const module of COPIED) {
    mkdirSync(dirname(join(dist, module)), { recursive: true });
    copyFileSync(join(compiled, module), join(dist, module));
  }
  const chunks = readdirSync(bundleFolder).filter((name) => name.endsWith('.js'));
  const bytes = chunks.reduce((sum, name) => sum + statSync(join(bundleFolder, name)).size, 0);
  console.log(`bundled ${library.length} modules and ${PROGRAMS.size} programs into ${chunks.length} files under dist/bundle (${(bytes / 1024).toFixed(0)} KiB)`);
}

await main();
