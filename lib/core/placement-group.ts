/**
 * Placement groups: bundles of resources reserved together on nodes, in two phases (every bundle
 * is first taken from its node's free resources; only when all succeed is the group committed,
 * else everything taken is given back), then used by tasks and actors scheduled into them.
 */
import { InfeasibleTaskError, InvalidArgumentError } from '../errors.js';
import { newObjectId } from '../store/object-id.js';
import type { Node } from './node.js';
import { ResourcePool, describeResources, toFixed, type Resources } from './resources.js';

export type PlacementStrategy = 'PACK' | 'SPREAD' | 'STRICT_PACK' | 'STRICT_SPREAD';

export interface PlacementGroupOptions {
  /** Reserve only on the driver's host, not on node agents (default false). */
  driverHost?: boolean;
}

/** The nodes a group may use. */
export function nodesFor(group: PlacementGroup, nodes: Node[]): Node[] {
  return group.driverHost ? nodes.filter((node) => node.localStore !== undefined) : nodes;
}

export interface Bundle {
  index: number;
  request: Map<string, number>;
  node?: Node;
  /** What is left of the bundle for tasks and actors placed in it. */
  pool?: ResourcePool;
}

export class PlacementGroup {
  readonly id = `pg-${newObjectId().slice(0, 16)}`;
  readonly bundles: Bundle[];
  readonly strategy: PlacementStrategy;
  /** 'rescheduling': a node holding some of its bundles left; they are being reserved again. */
  state: 'pending' | 'created' | 'rescheduling' | 'removed' | 'infeasible' = 'pending';
  readonly #ready: Promise<void>;
  #settle!: { resolve: () => void; reject: (error: Error) => void };
  #remove: (() => Promise<void>) | undefined;

  /**
   * Only nodes of the driver's own host (its logical nodes, not node agents'): for actors that
   * must share memory with the driver, as a compiled graph made there does.
   */
  readonly driverHost: boolean;

  constructor(bundles: Resources[], strategy: PlacementStrategy, options: PlacementGroupOptions = {}) {
    this.driverHost = options.driverHost ?? false;
    if (!Array.isArray(bundles) || bundles.length === 0) throw new InvalidArgumentError('a placement group needs at least one bundle');
    if (!['PACK', 'SPREAD', 'STRICT_PACK', 'STRICT_SPREAD'].includes(strategy)) {
      throw new InvalidArgumentError(`placement strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got '${strategy}'`);
    }
    this.bundles = bundles.map((resources, index) => {
      for (const [name, amount] of Object.entries(resources)) {
        if (!(amount >= 0)) throw new InvalidArgumentError(`bundle ${index} asks for ${amount} of ${name}`);
      }
      return { index, request: toFixed(resources) };
    });
    if (this.bundles.every((bundle) => bundle.request.size === 0)) {
      throw new InvalidArgumentError('every bundle of the placement group is empty');
    }
    this.strategy = strategy;
    this.#ready = new Promise((resolve, reject) => (this.#settle = { resolve, reject }));
    this.#ready.catch(() => {});
  }

  /** Resolves once every bundle is reserved; rejects if that can never happen. */
  ready(): Promise<void> {
    return this.#ready;
  }

  /** Gives its resources back, as removePlacementGroup(): `using group = placementGroup(...)`. */
  [Symbol.dispose](): void {
    void this.#remove?.();
  }

  /** Gives its resources back and resolves once the actors placed in it have exited. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.#remove?.();
  }

  /** @internal The cluster's removal of this group. */
  bindRemoval(remove: () => Promise<void>): void {
    this.#remove = remove;
  }

  /** @internal */
  markCreated(): void {
    this.state = 'created';
    this.#settle.resolve();
  }

  /** @internal */
  markFailed(error: Error): void {
    this.state = 'infeasible';
    this.#settle.reject(error);
  }

  /** @internal */
  markRemoved(): void {
    if (this.state === 'pending') this.#settle.reject(new InvalidArgumentError(`placement group ${this.id} was removed before it was ready`));
    this.state = 'removed';
  }
}

function sum(bundles: Bundle[]): Map<string, number> {
  const total = new Map<string, number>();
  for (const bundle of bundles) for (const [name, amount] of bundle.request) total.set(name, (total.get(name) ?? 0) + amount);
  return total;
}

/** Why the group can never be placed on these nodes, or undefined. */
export function infeasibility(group: PlacementGroup, allNodes: Node[]): InfeasibleTaskError | undefined {
  const nodes = nodesFor(group, allNodes);
  const where = group.driverHost ? " on the driver's host" : '';
  const fail = (reason: string) => new InfeasibleTaskError(`placement group ${group.id} (${group.strategy}) can never be placed${where}: ${reason}`, {});
  for (const bundle of group.bundles) {
    if (!nodes.some((node) => node.pool.fitsTotal(bundle.request))) {
      return fail(`bundle ${bundle.index} (${describeResources(bundle.request)}) fits no node`);
    }
  }
  if (group.strategy === 'STRICT_PACK' && !nodes.some((node) => node.pool.fitsTotal(sum(group.bundles)))) {
    return fail(`no node holds all bundles together (${describeResources(sum(group.bundles))})`);
  }
  if (group.strategy === 'STRICT_SPREAD' && group.bundles.length > nodes.length) {
    return fail(`${group.bundles.length} bundles need as many distinct nodes, the cluster has ${nodes.length}`);
  }
  return undefined;
}

/**
 * Phase one: choose a node per bundle and take its resources. Returns false (having given back
 * everything it took) when the group does not fit now.
 */
export function reserve(group: PlacementGroup, allNodes: Node[]): boolean {
  const nodes = nodesFor(group, allNodes);
  const taken: Array<[Node, Map<string, number>]> = [];
  const take = (node: Node, request: Map<string, number>) => {
    node.pool.acquire(request);
    taken.push([node, request]);
  };
  const rollback = () => {
    for (const [node, request] of taken) node.pool.release(request);
    return false;
  };
  const assignment: Node[] = [];
  const strategy = group.strategy;
  if (strategy === 'STRICT_PACK' || strategy === 'PACK') {
    const whole = nodes.find((node) => node.pool.fits(sum(group.bundles)));
    if (whole) {
      for (const bundle of group.bundles) {
        take(whole, bundle.request);
        assignment.push(whole);
      }
    } else if (strategy === 'STRICT_PACK') {
      return false;
    } else {
      // PACK falls back to as few nodes as it can: keep filling the node last used.
      let current: Node | undefined;
      for (const bundle of group.bundles) {
        const node = current && current.pool.fits(bundle.request) ? current : nodes.find((candidate) => candidate.pool.fits(bundle.request));
        if (!node) return rollback();
        take(node, bundle.request);
        assignment.push(node);
        current = node;
      }
    }
  } else {
    const used = new Map<Node, number>();
    for (const bundle of group.bundles) {
      const candidates = nodes.filter((node) => node.pool.fits(bundle.request) && (strategy === 'SPREAD' || !used.has(node)));
      if (candidates.length === 0) return rollback();
      // Least-used node first, so bundles land on distinct nodes whenever they can.
      const node = candidates.reduce((best, node) => ((used.get(node) ?? 0) < (used.get(best) ?? 0) ? node : best));
      take(node, bundle.request);
      used.set(node, (used.get(node) ?? 0) + 1);
      assignment.push(node);
    }
  }
  // Phase two: commit.
  group.bundles.forEach((bundle, index) => commit(bundle, assignment[index]));
  return true;
}

function commit(bundle: Bundle, node: Node): void {
  bundle.node = node;
  bundle.pool = new ResourcePool({});
  for (const [name, amount] of bundle.request) {
    bundle.pool.total.set(name, amount);
    bundle.pool.available.set(name, amount);
  }
}

/**
 * `node` left the cluster: the group's bundles there are lost (what ran in them died with it),
 * and the group waits for them to be reserved again. True if the group had bundles there.
 */
export function loseNode(group: PlacementGroup, node: Node): boolean {
  if (group.state !== 'created' && group.state !== 'rescheduling') return false;
  let lost = false;
  for (const bundle of group.bundles) {
    if (bundle.node !== node) continue;
    bundle.node = undefined;
    bundle.pool = undefined;
    lost = true;
  }
  if (lost) group.state = 'rescheduling';
  return lost;
}

/**
 * Reserves a rescheduling group's lost bundles again, keeping to its strategy with the bundles it
 * still has: STRICT_PACK on their node, STRICT_SPREAD on nodes none of them uses. All or none.
 */
export function reserveLost(group: PlacementGroup, allNodes: Node[]): boolean {
  const nodes = nodesFor(group, allNodes);
  const lost = group.bundles.filter((bundle) => !bundle.node);
  const kept = group.bundles.filter((bundle) => bundle.node).map((bundle) => bundle.node!);
  const taken: Array<[Node, Map<string, number>]> = [];
  const assignment: Node[] = [];
  for (const bundle of lost) {
    const allowed = (node: Node) => {
      if (group.strategy === 'STRICT_PACK') return kept.length > 0 ? node === kept[0] : assignment.length === 0 || node === assignment[0];
      if (group.strategy === 'STRICT_SPREAD') return !kept.includes(node) && !assignment.includes(node);
      return true;
    };
    // PACK prefers the group's own nodes; the rest take any that fits.
    const candidates = nodes.filter((node) => allowed(node) && node.pool.fits(bundle.request));
    const node = (group.strategy === 'PACK' ? candidates.find((candidate) => kept.includes(candidate) || assignment.includes(candidate)) : undefined) ?? candidates[0];
    if (!node) {
      for (const [taker, request] of taken) taker.pool.release(request);
      return false;
    }
    node.pool.acquire(bundle.request);
    taken.push([node, bundle.request]);
    assignment.push(node);
  }
  lost.forEach((bundle, index) => commit(bundle, assignment[index]));
  group.state = 'created';
  return true;
}

/** Gives a removed group's resources back to their nodes (what tasks still hold comes back later). */
export function releaseGroup(group: PlacementGroup): void {
  for (const bundle of group.bundles) {
    if (!bundle.node || !bundle.pool) continue;
    bundle.node.pool.release(bundle.pool.available);
  }
}
