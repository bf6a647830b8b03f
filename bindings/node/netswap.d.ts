// Types of the `netswap` package (both its `import` and `require` entries).
//
// Self-contained: they need neither @types/node nor the DOM library. Data comes back as
// Node's `Buffer` (a Uint8Array): typed as `Buffer` when @types/node is present, else as
// `Uint8Array`. `AbortSignal` is described by what this package uses of it.

/** Node's `Buffer` type when @types/node is present, else `Uint8Array` (which it is). */
export type NodeBuffer = typeof globalThis extends { Buffer: { alloc(size: number): infer B } } ? B : Uint8Array

/** What an AbortSignal must offer to abort a netswap call (Node's and the DOM's do). */
export interface AbortSignalLike {
  readonly aborted: boolean
  readonly reason?: unknown
  addEventListener(type: 'abort', listener: () => void, options?: { once?: boolean }): void
  removeEventListener(type: 'abort', listener: () => void): void
}

/** Every `error.code` a netswap call can reject with. */
export type NetswapErrorCode =
  | 'ACCESS_VIOLATION'
  | 'ADDRESS_FAULT'
  | 'MALFORMED'
  | 'TOO_LARGE'
  | 'QUOTA_EXCEEDED'
  | 'CONFLICT'
  | 'PROTOCOL_ERROR'
  | 'BUSY'
  | 'IO'
  | 'TIMEOUT'
  | 'DISCONNECTED'
  | 'BAD_REPLY'
  | 'INVALID_ARGUMENT'
  | 'CLOSED'

/** The errors netswap calls reject with. An aborted call rejects with its signal's reason instead. */
export declare class NetswapError extends Error {
  readonly code: NetswapErrorCode
  constructor(code: NetswapErrorCode, message: string, options?: { cause?: unknown })
}

/** The codes as constants, e.g. `ErrorCode.CONFLICT`. */
export declare const ErrorCode: { readonly [K in NetswapErrorCode]: K }

/** What identities other than the owner may do with a record. */
export interface AccessFlags {
  /** Others may read, inspect, watch and mirror. */
  read?: boolean
  /** Others may replace and write. */
  write?: boolean
  /** Others may take ownership (which clears this flag). */
  takeover?: boolean
}

/** Reconnection with exponential backoff and full jitter (on by default). */
export interface ReconnectOptions {
  /** Reconnect at all (default true). */
  enabled?: boolean
  /** The first backoff window in ms (default 100). */
  initialDelayMs?: number
  /** The largest backoff window in ms (default 5000). */
  maxDelayMs?: number
  /** Failed attempts in a row before the client closes for good (default 0: never). */
  maxAttempts?: number
}

/** Options for `Client.connect`. Durations are numbers of milliseconds. */
export interface ConnectOptions {
  /** Local address to connect from, e.g. "127.0.0.2" (another address is another identity). */
  localAddress?: string
  /** Each connection attempt's deadline (default 10000). */
  connectTimeoutMs?: number
  /** Each call's deadline, waiting for a reconnection included (default 30000; 0: none). */
  requestTimeoutMs?: number
  /** Reconnection: false to turn it off. */
  reconnect?: boolean | ReconnectOptions
  /** Ask the server something after this many ms of silence (default 15000; 0: never). */
  keepaliveMs?: number
  /**
   * The socket's receive buffer in bytes (SO_RCVBUF; default 0: the kernel's autotuning).
   * A small one (e.g. 262144) bounds how long a small reply can wait behind a large one
   * on a LAN, at the cost of throughput over long round trips.
   */
  receiveBuffer?: number
}

/** Per-call options. */
export interface CallOptions {
  /** This call's deadline in ms (0: none), instead of the client's `requestTimeoutMs`. */
  timeoutMs?: number
  /** Aborts the call: it rejects with `signal.reason` and its request is taken back. */
  signal?: AbortSignalLike
}

/** What `info` reports. */
export interface RecordInfo {
  size: bigint
  version: bigint
  access: AccessFlags
  owned: boolean
}

/** What `hello` reports. */
export interface ServerInfo {
  protocol: number
  maxRecordBytes: bigint
  maxMessageBytes: bigint
  orphanGraceSecs: number
  /** This client's identity, 64 hex digits. */
  identity: string
}

/** What happened to a watched record. */
export type WatchEventKind = 'changed' | 'deleted' | 'owner-changed' | 'access-changed'

/** One change to a watched record. */
export interface WatchEvent {
  event: WatchEventKind
  ptr: bigint
  /** The record's version after the event (the last version when deleted). */
  version: bigint
}

/** An active watch. */
export declare class Subscription {
  private constructor()
  /** Stops the watch (the server is told). Calling it again does nothing. */
  unsubscribe(): void
  /** True until `unsubscribe()` is called or the record is deleted. */
  readonly active: boolean
}

/** Where a client's connection stands. */
export type ConnectionStateName = 'connected' | 'reconnecting' | 'closed'

/** A change of `client.state`. */
export interface StateChange {
  state: ConnectionStateName
  /** The reconnection attempt ('reconnecting'; else 0). */
  attempt: number
  /** Why ('' when connected). */
  reason: string
}

/** Watch options. */
export interface WatchOptions {
  /** At most one event per this many ms (changes in between are merged). */
  minIntervalMs?: number
}

/** A connection to a netswap server; see the README. Pointers, versions, offsets,
 *  lengths and sizes are bigints; durations are numbers of milliseconds. */
export declare class Client {
  private constructor()
  static connect(address: string, options?: ConnectOptions): Promise<Client>
  /** This client's identity on the server, 64 hex digits. */
  readonly identity: string
  readonly state: ConnectionStateName
  readonly closed: boolean
  close(): void
  hello(options?: CallOptions): Promise<ServerInfo>
  create(data: Uint8Array, access?: AccessFlags, options?: CallOptions): Promise<bigint>
  read(ptr: bigint, options?: CallOptions): Promise<NodeBuffer>
  readRange(ptr: bigint, offset: bigint, length: bigint, options?: CallOptions): Promise<NodeBuffer>
  replace(ptr: bigint, data: Uint8Array, options?: CallOptions): Promise<bigint>
  writeAt(ptr: bigint, offset: bigint, data: Uint8Array, options?: CallOptions): Promise<bigint>
  replaceIf(ptr: bigint, expected: bigint, data: Uint8Array, options?: CallOptions): Promise<bigint>
  delete(ptr: bigint, options?: CallOptions): Promise<void>
  setAccess(ptr: bigint, access: AccessFlags, options?: CallOptions): Promise<void>
  takeover(ptr: bigint, options?: CallOptions): Promise<void>
  /** `to`: an IP address ("10.0.0.7") or a 64-hex-digit identity. */
  transfer(ptr: bigint, to: string, options?: CallOptions): Promise<void>
  info(ptr: bigint, options?: CallOptions): Promise<RecordInfo>
  watch(ptr: bigint, callback: (event: WatchEvent) => void, options?: WatchOptions): Promise<Subscription>
  mirror(ptr: bigint, options?: WatchOptions): Promise<Mirror>
  on(event: 'state', listener: (change: StateChange) => void): this
  on(event: ConnectionStateName, listener: (change: StateChange) => void): this
  once(event: 'state', listener: (change: StateChange) => void): this
  once(event: ConnectionStateName, listener: (change: StateChange) => void): this
  off(event: 'state' | ConnectionStateName, listener: (change: StateChange) => void): this
}

/** What happened to a mirror's copy. */
export type MirrorChangeKind = 'updated' | 'reloaded' | 'owner-changed' | 'access-changed' | 'deleted'

/** One update of a mirror. */
export interface MirrorChange {
  kind: MirrorChangeKind
  /** The copy's version right after it. */
  version: bigint
  /** The copy's size right after it. */
  size: bigint
  /** 'updated': the ranges that changed. */
  changed: { offset: bigint; length: bigint }[]
}

/** A local copy of a record that the server keeps exact. */
export declare class Mirror implements AsyncIterable<MirrorChange> {
  private constructor()
  readonly pointer: bigint
  /** A copy of the bytes, as they are now. */
  readonly data: NodeBuffer
  readonly version: bigint
  close(): void
  on(event: 'change', listener: (change: MirrorChange) => void): this
  on(event: 'end', listener: () => void): this
  once(event: 'change', listener: (change: MirrorChange) => void): this
  once(event: 'end', listener: () => void): this
  off(event: 'change', listener: (change: MirrorChange) => void): this
  off(event: 'end', listener: () => void): this
  [Symbol.asyncIterator](): AsyncIterator<MirrorChange>
}

/** Hex helpers for pointers (bigint <-> 16 hex digits). */
export declare const Pointer: {
  readonly toHex: (ptr: bigint) => string
  readonly fromHex: (text: string) => bigint
}
export declare function pointerToHex(ptr: bigint): string
export declare function pointerFromHex(text: string): bigint
