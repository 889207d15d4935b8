"""The ROS 2 side of vpr_ros: the only package that imports rclpy and ROS message modules.

- ``localizer_node``: the lifecycle node (console script ``localizer_node``)
- ``conversions``: rclpy messages <-> numpy arrays
- ``latest_slot``: the bounded latest-frame hand-over between callback and worker
- ``node_stats``: rates, drop counts and latencies reported on /diagnostics
- ``replay``: publish a bag into a running node and collect what it publishes

Nothing is imported here eagerly, so ``import vpr_ros.ros`` works without a sourced ROS.
"""
