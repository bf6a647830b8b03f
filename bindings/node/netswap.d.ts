// Types of the `netswap` entry module: the napi-rs generated declarations
// (index.d.ts) plus the error codes and pointer helpers added by netswap.js.
import { Client, Subscription, pointerToHex, pointerFromHex } from './index'

export {
  Client,
  Subscription,
  pointerToHex,
  pointerFromHex,
  AccessFlags,
  ConnectOptions,
  RecordInfo,
  ServerInfo,
  WatchEvent,
} from './index'

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

/** The errors netswap calls reject with. */
export interface NetswapError extends Error {
  code: NetswapErrorCode
}

/** The codes as constants, e.g. `ErrorCode.CONFLICT`. */
export declare const ErrorCode: { readonly [K in NetswapErrorCode]: K }

/** Hex helpers for pointers (bigint <-> 16 hex digits). */
export declare const Pointer: {
  readonly toHex: typeof pointerToHex
  readonly fromHex: typeof pointerFromHex
}
