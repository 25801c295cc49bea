/**
 * Communication between ranks, as the MoE layer and the trainer see it.
 *
 * <ul>
 *   <li>{@link dev.moe4j.core.comm.Communicator}: rank, size, all-to-all (equal and variable row splits, and
 *       row blocks placed anywhere: {@link dev.moe4j.core.comm.RowBlocks}), all-reduce (sum, max, min), all-gather, reduce-scatter, broadcast, barrier, send/recv, split into
 *       sub-groups; on backend tensors, queued on the backend's stream.</li>
 *   <li>{@link dev.moe4j.core.comm.ProcessGroups}: DeepSpeed's expert-parallel and expert-data-parallel groups.</li>
 *   <li>{@link dev.moe4j.core.comm.CommOptions}: the watchdog timeout (default 60 s); a peer that fails or hangs
 *       ends every waiting rank with a {@link dev.moe4j.core.comm.CommTimeoutException} or
 *       {@link dev.moe4j.core.comm.CommunicationException} naming the collective and the missing ranks.</li>
 * </ul>
 *
 * Implementations live in moe-comm (the core knows none of them): {@code dev.moe4j.comm.InProcessWorld} (N ranks as
 * N threads, for CPU tests), {@code dev.moe4j.comm.nccl.NcclCommunicator} (one process per GPU) and
 * {@code dev.moe4j.comm.HierarchicalCommunicator} (the paper's two-level all-to-all around either).
 */
package dev.moe4j.core.comm;
