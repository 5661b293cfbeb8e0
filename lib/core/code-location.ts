/**
 * Where a registered function's module is, in words every host reads the same way.
 *
 * A descriptor names a module by URL, and a worker imports that URL. Two kinds of module live at
 * different paths on different hosts, so their URLs are rewritten on the way out and back:
 * - trellis's own modules are named `trellis:<path in the library>` (no extension), so a head
 *   whose trellis is installed in one place drives agents whose trellis is in another;
 * - a working directory shipped to a host (code-package.ts) keeps the driver's URL as its name,
 *   and a worker there maps the driver's root to where its copy was unpacked.
 */
import { extname } from 'node:path';
import { twinSource } from './worker-loader.js';

const libraryRoot = new URL('..', import.meta.url).href;
/** '.ts' where trellis runs from its sources, '.js' where it runs built. */
const libraryExtension = extname(new URL(import.meta.url).pathname);
const LIBRARY_SCHEME = 'trellis:';

/** The driver's working directory (a file URL ending in '/') and this host's copy of it. */
let workingDirectory: { canonical: string; local: string } | undefined;

/** In a worker on another host: modules under `canonical` are read from `local` here (none: no mapping). */
export function mapWorkingDirectory(canonical?: string, local?: string): void {
  const slash = (url: string) => (url.endsWith('/') ? url : `${url}/`);
  workingDirectory = canonical !== undefined && local !== undefined ? { canonical: slash(canonical), local: slash(local) } : undefined;
}

/** The name a module's URL goes by in descriptors (what every host reads the same way). */
export function canonicalModule(url: string): string {
  // A compiled twin (worker-loader.ts) goes by its source's name, which the driver ran.
  url = twinSource(url) ?? url;
  if (url.startsWith(libraryRoot)) {
    const path = url.slice(libraryRoot.length);
    const extension = extname(path);
    return LIBRARY_SCHEME + (extension === libraryExtension ? path.slice(0, -extension.length) : path);
  }
  if (workingDirectory && url.startsWith(workingDirectory.local)) return workingDirectory.canonical + url.slice(workingDirectory.local.length);
  return url;
}

/** The URL this process imports for a descriptor's module. */
export function localModule(name: string): string {
  if (name.startsWith(LIBRARY_SCHEME)) {
    const path = name.slice(LIBRARY_SCHEME.length);
    return libraryRoot + (extname(path) === '' ? path + libraryExtension : path);
  }
  if (workingDirectory && name.startsWith(workingDirectory.canonical)) return workingDirectory.local + name.slice(workingDirectory.canonical.length);
  return name;
}

/** Whether a descriptor's module is one of trellis's own. */
export function isLibraryModule(name: string): boolean {
  return name.startsWith(LIBRARY_SCHEME);
}
