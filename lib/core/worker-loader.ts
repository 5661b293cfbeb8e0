/**
 * How a worker process loads code: its command line, and the module loader it registers once it
 * first imports one of the driver's modules.
 *
 * A loader's hooks see every module loaded after them, each one a message to the hooks thread:
 * trellis and its dependencies through tsx cost a worker about a second of CPU, against half that
 * without hooks, and tsx alone takes a third of a second to register. So a worker loads trellis
 * before any hook exists, and registers the TypeScript loader only when it imports a TypeScript
 * module of the driver's, or any where the driver itself runs TypeScript (a prestarted worker that
 * never runs a task never pays for it).
 *
 * Run from its sources (a checkout, its tests), trellis would have its workers compile the whole
 * library through tsx. Where the checkout has a build no older than any source (`npm run build`,
 * which `npm ci` runs), workers run that build, and a resolve hook sends the driver's imports of
 * the library's sources to the same built modules, so a worker has one copy of trellis. The same
 * holds for a process of the checkout run from its build (a node agent, say) whose workers import
 * modules that name the sources.
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = fileURLToPath(import.meta.url);
const fromSources = here.endsWith('.ts');
/** The library's root folder (lib/ in a checkout, dist/ built). */
const libraryDirectory = dirname(dirname(here));

/**
 * Library modules whose actors run in workers that load only the class's module, not the public
 * API a worker otherwise loads before its hello: an LLM rank needs its shard, kernels and
 * communicator (0.2 s of CPU and 56 MB to start, measured on the 2-core VM), not the data layer,
 * apache-arrow and serving besides (0.48 s, 76 MB). Each is an entry of its own in the bundle
 * (scripts/bundle-library.ts's LIGHT_ENTRIES), so that importing it loads no more than it needs.
 * Only classes whose calls carry no value of a class registered outside that module's tree (a
 * DeploymentHandle, a DataIterator, an Arrow table): it would arrive in a process that never
 * loaded the module that reads it. (Serve's directory, tried, receives such values.)
 */
const LIGHT_ACTOR_MODULES = ['llm/shard-worker'];

/** Whether an actor of the class registered from `module` runs in a worker that skips the public API's preload. */
export function isLightActorModule(module: string): boolean {
  // The library's own classes are registered under 'trellis:<module path>' (see registry.ts).
  return module.startsWith('trellis:') && LIGHT_ACTOR_MODULES.includes(module.slice('trellis:'.length));
}

/** What a worker registers when it first imports a driver's module (TRELLIS_WORKER_LOADER). */
interface DeferredLoader {
  /** The TypeScript loader's URL (tsx, a dependency of trellis), where it resolves. */
  typeScript?: string;
  /** Register it before any of the driver's modules (the driver runs TypeScript), not only a TypeScript one. */
  everyModule?: boolean;
  /** Imports of the library's sources (a folder URL) go to its build (another) instead. */
  sources?: string;
  build?: string;
}

const LOADER_VARIABLE = 'TRELLIS_WORKER_LOADER';

/** A checkout's library sources and their build (folders). */
export interface LibraryBuild {
  sources: string;
  build: string;
}

let checkedBuild: LibraryBuild | undefined | null = null;

/**
 * In a checkout of trellis (its sources in lib/ beside the build in dist/), the two where every
 * source module has a built twin no older than it; undefined in an installed package (no
 * sources), or where the build is missing or stale (then workers of a driver run from sources
 * compile them). TRELLIS_WORKER_FROM_SOURCES=1 turns it off.
 */
export function freshLibraryBuild(): LibraryBuild | undefined {
  if (checkedBuild !== null) return checkedBuild;
  checkedBuild = undefined;
  if (process.env.TRELLIS_WORKER_FROM_SOURCES === '1') return undefined;
  const root = dirname(libraryDirectory);
  const sources = join(root, 'lib');
  const build = join(root, 'dist');
  const fresh = (folder: string): boolean => {
    for (const entry of readdirSync(join(sources, folder), { withFileTypes: true })) {
      const path = join(folder, entry.name);
      if (entry.isDirectory()) {
        if (!fresh(path)) return false;
      } else if (entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts')) {
        const built = statSync(join(build, path.replace(/\.ts$/, '.js')), { throwIfNoEntry: false });
        if (!built || built.mtimeMs < statSync(join(sources, path)).mtimeMs) return false;
      }
    }
    return true;
  };
  try {
    if (existsSync(sources) && existsSync(build) && fresh('.')) checkedBuild = { sources, build };
  } catch {
    // An unreadable tree: no build to trust.
  }
  return checkedBuild;
}

/** The Node.js flags this process runs with: its command line's and NODE_OPTIONS'. */
function driverNodeFlags(): string[] {
  return [...process.execArgv, ...(process.env.NODE_OPTIONS?.split(/\s+/) ?? [])];
}

/**
 * Whether the driver's modules need a TypeScript loader: the driver has one, or runs a TypeScript
 * entry, or trellis itself runs from its sources.
 */
export function driverRunsTypeScript(): boolean {
  return fromSources
    || driverNodeFlags().some((flag) => /(^|[/\\=])tsx([/\\]|$)/.test(flag) || flag.includes('/tsx/dist/'))
    || /\.[mc]?tsx?$/.test(process.argv[1] ?? '');
}

function resolveFromHere(specifier: string): string | undefined {
  try {
    return import.meta.resolve(specifier);
  } catch {
    // Older Node.js without a synchronous import.meta.resolve.
    return undefined;
  }
}

/** A worker's command line and the environment it adds. */
export interface WorkerCommand {
  args: string[];
  env: Record<string, string>;
}

const commands = new Map<boolean, WorkerCommand>();

function buildCommand(typeScript: boolean): WorkerCommand {
  const flags = driverNodeFlags().filter((flag) => flag === '--experimental-strip-types' || flag === '--experimental-transform-types');
  // By its path: a worker may start in a working directory (runtimeEnv) that cannot resolve it.
  const loader = resolveFromHere('tsx');
  const build = freshLibraryBuild();
  if (fromSources && !build) {
    // Compiling the library: the large dependencies load first, before the loader's hooks.
    const preload = ['apache-arrow', 'msgpackr'].flatMap((name) => {
      const url = resolveFromHere(name);
      return url ? ['--import', url] : [];
    });
    return { args: [...flags, ...preload, '--import', loader ?? 'tsx', join(libraryDirectory, 'core', 'worker-main.ts')], env: {} };
  }
  const entry = join(build?.build ?? libraryDirectory, 'core', 'worker-main.js');
  const deferred: DeferredLoader = {
    ...(loader ? { typeScript: loader, ...(typeScript ? { everyModule: true } : {}) } : {}),
    ...(build ? { sources: pathToFileURL(build.sources + '/').href, build: pathToFileURL(build.build + '/').href } : {}),
  };
  return { args: [...flags, entry], env: Object.keys(deferred).length > 0 ? { [LOADER_VARIABLE]: JSON.stringify(deferred) } : {} };
}

/**
 * The command line of a worker process, and what it adds to the environment. `typeScript`:
 * whether the driver runs TypeScript, so that even its .js modules are loaded through the loader
 * (a node agent is told by its head, whose modules its workers import).
 */
export function workerCommand(typeScript = driverRunsTypeScript()): WorkerCommand {
  let command = commands.get(typeScript);
  if (!command) commands.set(typeScript, (command = buildCommand(typeScript)));
  // TRELLIS_WORKER_NODE_ARGS: extra Node.js flags for workers (profiling, inspecting).
  const extra = process.env.TRELLIS_WORKER_NODE_ARGS?.split(' ').filter(Boolean) ?? [];
  // --expose-gc: a worker collects garbage when the zero-copy views it made may pin much of the
  // store (see worker-main.ts).
  return { args: [...extra, '--expose-gc', ...command.args], env: command.env };
}

const TYPESCRIPT_MODULE = /\.[mc]?tsx?$/;
let deferred: DeferredLoader | undefined | null = null;
let registering: Promise<void> | undefined;

/**
 * In a worker, before it imports the driver's module `url`: registers the loader its command
 * deferred, once, if the module needs it (a TypeScript module, or any where the driver runs
 * TypeScript). The variable is taken out of the environment, so processes the user's code starts
 * do not inherit it.
 */
export function prepareDriverModule(url: string): Promise<void> {
  if (registering) return registering;
  if (deferred === null) {
    const text = process.env[LOADER_VARIABLE];
    delete process.env[LOADER_VARIABLE];
    deferred = text ? (JSON.parse(text) as DeferredLoader) : undefined;
  }
  const loader = deferred;
  if (!loader?.typeScript || !(loader.everyModule || TYPESCRIPT_MODULE.test(new URL(url).pathname))) return Promise.resolve();
  registering = (async () => {
    await import(loader.typeScript!);
    // After the TypeScript loader, so that it runs first and sees what that one resolved.
    if (loader.sources && loader.build) {
      const { register } = await import('node:module');
      register(new URL('library-build-hooks.js', import.meta.url), { data: { sources: loader.sources, build: loader.build } });
    }
  })();
  return registering;
}

/**
 * Compiled twins of a checkout's own TypeScript outside the library (its tests' fixtures, say):
 * the test suite writes each module's JavaScript to dist-test/, at the same path under it as the
 * source under the checkout, and dist-test/lib links to the build, so a twin's imports of the
 * library land on the modules the worker already runs. A worker that imports such a module takes
 * its fresh twin, natively: registering the TypeScript loader costs a worker a third of a second
 * of CPU, more than the rest of its start-up after Node.js's own, and a suite starts hundreds of
 * workers. A twin registers its functions under its source's name (canonicalModule), so the
 * driver, which ran the source, and the worker agree on every name. Only where the library runs
 * built (the twins import the build); a twin older than its source is ignored.
 */
export const TWINS_FOLDER = 'dist-test';
export const TWINS_VARIABLE = 'TRELLIS_COMPILED_TWINS';
const checkoutRoot = dirname(libraryDirectory);
const twinsRoot = pathToFileURL(join(checkoutRoot, TWINS_FOLDER)).href + '/';
const checkoutUrl = pathToFileURL(checkoutRoot).href + '/';
const TWIN_SOURCE = /\.([mc]?)ts$/;
const twinOf = new Map<string, string | undefined>();

/**
 * The URL of a fresh compiled twin of the TypeScript module at `url`; undefined if none, or where
 * twins are not in use: only the test suite's processes use them (TRELLIS_COMPILED_TWINS=1, set by
 * its global setup), so that examples and benchmarks run from a checkout load TypeScript as a
 * user's program does.
 */
export function compiledTwin(url: string): string | undefined {
  if (process.env[TWINS_VARIABLE] !== '1' || fromSources || !url.startsWith(checkoutUrl) || !TWIN_SOURCE.test(url) || url.startsWith(twinsRoot)) return undefined;
  if (twinOf.has(url)) return twinOf.get(url);
  let twin: string | undefined;
  const path = url.slice(checkoutUrl.length);
  if (!path.startsWith('lib/') && !path.startsWith('node_modules/') && freshLibraryBuild()) {
    const candidate = twinsRoot + path.replace(TWIN_SOURCE, '.$1js');
    const built = statSync(fileURLToPath(candidate), { throwIfNoEntry: false });
    const source = statSync(fileURLToPath(url), { throwIfNoEntry: false });
    if (built && source && built.mtimeMs >= source.mtimeMs) twin = candidate;
  }
  twinOf.set(url, twin);
  return twin;
}

let mappingTwins = false;

/**
 * Before a worker imports a twin: Node.js's source maps on, so that stacks thrown there name the
 * source's file and lines (the twins carry their maps inline). Modules loaded earlier (the
 * library) are not mapped, as before.
 */
export function mapTwinStacks(): void {
  if (mappingTwins) return;
  mappingTwins = true;
  process.setSourceMapsEnabled(true);
}

/** The source a compiled twin was made from (its URL), for a twin's URL; undefined for any other. */
export function twinSource(url: string): string | undefined {
  if (fromSources || !url.startsWith(twinsRoot)) return undefined;
  return checkoutUrl + url.slice(twinsRoot.length).replace(/\.([mc]?)js$/, '.$1ts');
}
