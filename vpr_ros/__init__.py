"""vpr_ros: visual place recognition for ROS 2 (SciceVPR global descriptors, SelaVPR re-ranking).

The core (models, maps, localizer, evaluation, training) is ROS-free; only
``vpr_ros.ros`` imports rclpy.
"""

__version__ = "0.1.0"
