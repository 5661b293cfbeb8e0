/**
 * Module hooks of a worker that runs trellis's build while the driver runs its sources (see
 * worker-loader.ts): an import that resolves to a source module of the library gets the built
 * module instead, the one the worker's runtime already loaded, so there is one copy of trellis.
 * Runs on Node.js's hooks thread: it imports nothing.
 */
interface Roots {
  sources: string;
  build: string;
}

let roots: Roots | undefined;

export function initialize(data: Roots): void {
  roots = data;
}

type NextResolve = (specifier: string, context: unknown) => Promise<{ url: string; format?: string | null }>;

export async function resolve(specifier: string, context: unknown, nextResolve: NextResolve): Promise<{ url: string; format?: string | null }> {
  const resolved = await nextResolve(specifier, context);
  if (!roots || !resolved.url.startsWith(roots.sources) || !/\.[mc]?ts$/.test(resolved.url)) return resolved;
  const path = resolved.url.slice(roots.sources.length).replace(/\.([mc]?)ts$/, '.$1js');
  return { ...resolved, url: roots.build + path, format: 'module' };
}
